"""Checkpoints on S3, through boto3.

Credentials and the endpoint come from the environment or an AWS profile, as
boto3 reads them (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3``
for an S3-compatible server); nothing here logs or stores them.
"""

from __future__ import annotations

from pathlib import Path


class S3Error(RuntimeError):
    """An S3 location tinymod cannot read, with what to check."""


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise S3Error(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def download_prefix(uri: str, cache: Path) -> Path:
    """Every object under ``uri`` into ``cache/<bucket>/<prefix>/``; files already there with the same size are kept."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_uri(uri)
    target = cache / bucket / prefix
    s3 = boto3.client("s3")
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        objects = [obj for page in pages for obj in page.get("Contents", [])]
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise S3Error(f"{uri}: bucket {bucket!r} does not exist at {s3.meta.endpoint_url}") from None
        raise S3Error(f"{uri}: {code or error}; check the credentials (AWS_PROFILE / AWS_ACCESS_KEY_ID) and the endpoint") from None
    except BotoCoreError as error:
        raise S3Error(f"{uri}: cannot reach {s3.meta.endpoint_url}: {error}") from None
    if not objects:
        raise S3Error(f"{uri}: no objects under this prefix")
    for obj in objects:
        relative = obj["Key"][len(prefix) :].lstrip("/")
        local = target / relative
        if not local.resolve().is_relative_to(target.resolve()):
            raise S3Error(f"{uri}: key {obj['Key']!r} would be written outside {target}")
        if local.exists() and local.stat().st_size == obj["Size"]:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, obj["Key"], str(local))
    return target


def check_bucket(uri: str, attempts: int = 4, backoff_s: float = 1.0) -> None:
    """Fail early and clearly when ``uri``'s bucket is missing or its endpoint unreachable.

    An unreachable endpoint is retried ``attempts`` times with exponential backoff
    (``backoff_s``, doubled each time) before giving up; a missing bucket fails at once.
    """
    import time

    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    bucket, _ = split_uri(uri)
    s3 = boto3.client("s3", config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=10))
    for attempt in range(1, attempts + 1):
        try:
            s3.head_bucket(Bucket=bucket)
            return
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise S3Error(f"{uri}: bucket {bucket!r} does not exist at {s3.meta.endpoint_url}; create it or fix the URI") from None
            if code in ("403", "AccessDenied"):
                raise S3Error(f"{uri}: access to bucket {bucket!r} denied; check AWS_PROFILE / AWS_ACCESS_KEY_ID") from None
            raise S3Error(f"{uri}: {code or error}") from None
        except (EndpointConnectionError, BotoCoreError) as error:
            if attempt == attempts:
                raise S3Error(
                    f"{uri}: endpoint {s3.meta.endpoint_url} unreachable after {attempts} attempts ({error}); "
                    "check AWS_ENDPOINT_URL_S3 / MLFLOW_S3_ENDPOINT_URL and that the server is up"
                ) from None
            time.sleep(backoff_s * 2 ** (attempt - 1))
