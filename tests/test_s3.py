"""S3 through boto3 against a real S3-compatible server on loopback (moto's server mode)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from model.s3 import S3Error, check_bucket, download_prefix, endpoint_url
from bench.workspace import dvc_env

from .conftest import bucket


def test_checkpoint_download_from_a_prefix(s3_env, tmp_path):
    s3 = bucket("teachers")
    s3.put_object(Bucket="teachers", Key="llava/config.json", Body=b"{}")
    s3.put_object(Bucket="teachers", Key="llava/sub/model.safetensors", Body=b"weights")
    local = download_prefix("s3://teachers/llava", tmp_path)
    assert (local / "config.json").read_bytes() == b"{}" and (local / "sub/model.safetensors").read_bytes() == b"weights"


def test_mlflow_s3_endpoint_alone_is_the_endpoint(monkeypatch, s3_env):
    bucket("mlflow-only")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    assert endpoint_url() == s3_env
    check_bucket("s3://mlflow-only/artifacts", attempts=1)  # reaches the local server, not s3.amazonaws.com


def test_disagreeing_endpoints_are_refused(monkeypatch, s3_env):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(S3Error, match="S3 endpoints disagree.*AWS_ENDPOINT_URL_S3=.*MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9"):
        check_bucket("s3://any/prefix", attempts=1)


def test_a_missing_bucket_is_named(s3_env):
    with pytest.raises(S3Error, match="bucket 'no-such-bucket' does not exist"):
        check_bucket("s3://no-such-bucket/mlflow")
    with pytest.raises(S3Error, match="no-such-bucket"):
        download_prefix("s3://no-such-bucket/x", Path("/tmp"))


def test_dvc_remote_push_and_pull(s3_env, tmp_path):
    bucket("dvc-store")
    root = tmp_path / "repo"
    root.mkdir()
    env = {**dvc_env(), "HOME": str(tmp_path)}

    def run(*args: str) -> str:
        out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr

    dvc = [sys.executable, "-m", "dvc"]
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "remote", "add", "-d", "s3", "s3://dvc-store/tinymod")
    run(*dvc, "remote", "modify", "s3", "endpointurl", s3_env)
    (root / "data.txt").write_text("curated records\n")
    run(*dvc, "add", "data.txt")
    log = run(*dvc, "push")
    assert "tinymod-secret-never-logged" not in log and "tinymod-secret" not in (root / ".dvc/config").read_text()
    (root / "data.txt").unlink()
    shutil.rmtree(root / ".dvc/cache")  # so the pull must come from S3
    run(*dvc, "pull")
    assert (root / "data.txt").read_text() == "curated records\n"


def test_mlflow_artifacts_on_s3_register_and_download_by_alias(s3_env, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    bucket("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("s3-test", artifact_location="s3://mlflow/artifacts")
    check_bucket(client.get_experiment(experiment).artifact_location)
    run = client.create_run(experiment)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "llava"}')
    client.log_artifacts(run.info.run_id, str(checkpoint), artifact_path="model")
    client.create_registered_model("s3-student")
    version = client.create_model_version("s3-student", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("s3-student", "champion", version.version)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="mlflow")["Contents"]]
    assert any(k.endswith("model/config.json") for k in keys)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    path = mlflow.artifacts.download_artifacts("models:/s3-student@champion", dst_path=str(tmp_path / "back"))
    assert (Path(path) / "config.json").read_text() == '{"model_type": "llava"}'


def test_a_changed_artifact_location_is_refused_not_ignored(tmp_path):
    from tasks import tracking
    from tasks.params import load_params

    from .conftest import write_params

    local = load_params(write_params(tmp_path, {"tracking": {"experiment": "moved"}}))
    _, experiment_id = tracking.client(local.tracking, tmp_path)
    on_s3 = load_params(write_params(tmp_path, {"tracking": {"experiment": "moved", "artifact_location": "s3://bucket/mlflow"}}))
    with pytest.raises(tracking.TrackingError, match=r"stores artifacts in file://.*but tracking.artifact_location is s3://bucket/mlflow.*new name"):
        tracking.client(on_s3.tracking, tmp_path)
    assert tracking.client(local.tracking, tmp_path)[1] == experiment_id
