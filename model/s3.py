"""Checkpoints on S3, through boto3.

Credentials come from the environment or an AWS profile, as boto3 reads them
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``); nothing here logs or stores them. The
endpoint of an S3-compatible server is resolved once, by ``endpoint_url()``,
from the variables boto3 and MLflow read, and every client here uses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from model.errors import TinymodError

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
MANIFEST = ".tinymod-etags.json"  # beside a cached prefix: file -> ETag it was downloaded with


class S3Error(TinymodError, RuntimeError):
    """An S3 location tinymod cannot read, with what to check."""


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise S3Error(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def endpoint_url() -> str | None:
    """The one S3 endpoint (None: AWS's own), from AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL.

    When they name different endpoints, credentials meant for one could reach the other, and MLflow
    would write artifacts where tinymod does not read them: that is refused.
    """
    named = {name: os.environ[name].rstrip("/") for name in ENDPOINT_VARIABLES if os.environ.get(name)}
    if len(set(named.values())) > 1:
        listed = ", ".join(f"{name}={value}" for name, value in named.items())
        raise S3Error(f"S3 endpoints disagree ({listed}); set them to one URL, or unset all but one")
    return next(iter(named.values()), None)


def client(**config):
    """A boto3 S3 client on ``endpoint_url()``; ``config`` goes to botocore's ``Config``."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url(), config=Config(**config) if config else None)


def download_prefix(uri: str, cache: Path) -> Path:
    """Every object under ``uri`` into ``cache/<bucket>/<prefix>/``.

    A file already there is kept only when the object's ETag is the one it was downloaded with
    (a manifest beside the folder records them): a same-sized replacement is downloaded again.
    Each file is written to a temporary name and renamed, so a killed download leaves no partial file.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_uri(uri)
    target = cache / bucket / prefix
    s3 = client()
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
    manifest_path = target.parent / f"{target.name}{MANIFEST}"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for obj in objects:
        relative = obj["Key"][len(prefix) :].lstrip("/")
        local = target / relative
        if not local.resolve().is_relative_to(target.resolve()):
            raise S3Error(f"{uri}: key {obj['Key']!r} would be written outside {target}")
        if local.exists() and manifest.get(relative) == obj["ETag"]:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + ".partial")
        try:
            s3.download_file(bucket, obj["Key"], str(partial))
        except (ClientError, BotoCoreError) as error:
            raise S3Error(f"{uri}: downloading {obj['Key']!r} from {s3.meta.endpoint_url} failed: {error}") from None
        partial.replace(local)
        manifest[relative] = obj["ETag"]
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return target


def check_bucket(uri: str, attempts: int = 4, backoff_s: float = 1.0) -> None:
    """Fail early and clearly when ``uri``'s bucket is missing or its endpoint unreachable.

    An unreachable endpoint is retried ``attempts`` times with exponential backoff
    (``backoff_s``, doubled each time) before giving up; a missing bucket fails at once.
    """
    import time

    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    bucket, _ = split_uri(uri)
    s3 = client(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=10)
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
