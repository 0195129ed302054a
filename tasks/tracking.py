"""MLflow for every stage: one experiment, one run per stage execution, tagged for lineage.

The default store is a local SQLite file under the repo (``.mlflow/``, git-ignored)
with local artifacts; ``tracking.uri`` may name a server and
``tracking.artifact_location`` an ``s3://`` prefix instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

from tasks.common import StageFailure
from tasks.params import Params, Tracking


# MLflow's start-up notes (database tables created, system metrics started, no GPU to watch) are
# nothing a stage's user acts on; its warnings and errors still show.
for _name in ("mlflow.store.db.utils", "mlflow.system_metrics"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class TrackingError(StageFailure):
    """The MLflow store cannot be used as configured; the message says what to change."""


def tracking_uri(tracking: Tracking, root: Path) -> str:
    """``tracking.uri`` with a relative SQLite path made absolute against the repo root."""
    uri = tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        db = (root / uri[len(prefix) :]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(db)
    return uri


def artifact_location(tracking: Tracking, root: Path) -> str:
    location = tracking.artifact_location
    if "://" in location:
        return location
    path = (root / location).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def client(tracking: Tracking, root: Path = Path(".")):
    """An ``MlflowClient`` on the configured store, and the experiment id (created on first use)."""
    return _client(tracking_uri(tracking, root), tracking.experiment, artifact_location(tracking, root))


def check_server(uri: str, attempts: int = 3, backoff_s: float = 1.0) -> None:
    """An http(s) tracking server answers, or TrackingError after ``attempts`` tries with backoff.

    MLflow's own client retries a dead server for minutes before a traceback; this says which
    server, what was tried for how long, and what to do, before the stage's work starts.
    """
    import time
    import urllib.error
    import urllib.request

    started, reason = time.time(), ""
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                return
        except urllib.error.HTTPError as error:
            if error.code < 500:  # it answers: a proxy or an older server without /health
                return
            reason = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            reason = str(getattr(error, "reason", error))
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable (service unreachable: {attempts} attempts over "
        f"{time.time() - started:.0f} s, last: {reason}). Start it (mlflow server --port ...) or point "
        "tracking.uri at a running one; a Prefect flow run retries the stage."
    )


@functools.cache
def _client(uri: str, experiment_name: str, artifacts: str):
    # Opening a store costs seconds (imports, schema check): once per process and store.
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        check_server(uri)

    mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    if experiment is None:
        experiment_id = mlflow_client.create_experiment(experiment_name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
        # An experiment keeps the artifact root it was created with: a changed
        # tracking.artifact_location (s3:// instead of a folder, another bucket) would otherwise be
        # ignored without a word. Two local folders differ when a checkout is moved or copied with
        # its store; the store's own folder is kept then, as MLflow does.
        both_local = experiment.artifact_location.startswith("file:") and artifacts.startswith("file:")
        if not both_local and experiment.artifact_location.rstrip("/") != artifacts.rstrip("/"):
            raise TrackingError(
                f"MLflow experiment {experiment_name!r} at {uri} stores artifacts in {experiment.artifact_location}, "
                f"but tracking.artifact_location is {artifacts}. MLflow cannot move an experiment's artifacts: "
                "set tracking.experiment to a new name, or restore tracking.artifact_location."
            )
    return mlflow_client, experiment_id


def git_commit(root: Path = Path(".")) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def params_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def flatten(data: dict, separator: str = ".", prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: nested sections as MLflow param or metric names."""
    out: dict = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, separator, name + separator))
        else:
            out[name] = value
    return out


def start_stage_run(params: Params, stage: str, section: dict, root: Path = Path("."), run_id: str | None = None) -> str:
    """Open (or reopen, after a crash) the MLflow run of one stage; returns its id."""
    from mlflow.entities import Param, RunTag

    mlflow_client, experiment_id = client(params.tracking, root)
    if run_id is not None:
        run = mlflow_client.get_run(run_id)
        if run.info.lifecycle_stage == "active":
            mlflow_client.update_run(run_id, status="RUNNING")
            return run_id
    tags = {
        "tinymod.stage": stage,
        "tinymod.recipe": params.recipe,
        "tinymod.preset": params.preset,
        "tinymod.params_hash": params_hash(section),
        "mlflow.source.git.commit": git_commit(root),
        "mlflow.runName": f"{stage}",
        "tinymod.pipeline_run": pipeline_run_tag(params, root),
    }
    run = mlflow_client.create_run(experiment_id, tags=tags, run_name=stage)
    # MLflow params are strings of at most 6000 characters.
    items = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000]) for k, v in flatten(section).items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run.info.run_id, params=items[start : start + 100], tags=[RunTag("tinymod.seed", str(params.seed))])
    return run.info.run_id


def system_metrics(tracking: Tracking, run_id: str, root: Path = Path(".")):
    """CPU, memory, disk, network (and GPU) of this machine into the run every 10 s while a job trains; None when off."""
    if not tracking.system_metrics:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=tracking_uri(tracking, root))
    monitor.start()
    return monitor


def pipeline_run_tag(params: Params, root: Path = Path(".")) -> str:
    """What groups the stage runs of one pipeline run: the Prefect flow run, else the commit and resolved params."""
    return os.environ.get("TINYMOD_PIPELINE_RUN") or f"{git_commit(root)[:10]}-{params_hash(params.model_dump(mode='json'))}"


def finish_run(
    tracking: Tracking, run_id: str, metrics: dict, artifacts: list[Path], root: Path = Path("."), failed: bool = False, checkpoint: Path | None = None
) -> None:
    """Log the stage's final metrics (numbers only, flattened), artifacts and checkpoint (under ``model/``), then close the run."""
    from mlflow.entities import Metric

    mlflow_client, _ = client(tracking, root)
    numbers = {k: float(v) for k, v in flatten(metrics, "/").items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    batch = [Metric(k, v, 0, 0) for k, v in numbers.items()]
    for start in range(0, len(batch), 500):
        mlflow_client.log_batch(run_id, metrics=batch[start : start + 500])
    for path in artifacts:
        if path.exists():
            mlflow_client.log_artifact(run_id, str(path), artifact_path="plots" if path.suffix == ".png" else None)
    if checkpoint is not None and checkpoint.is_dir():
        mlflow_client.log_artifacts(run_id, str(checkpoint), artifact_path="model")
    mlflow_client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")



def log_steps(tracking: Tracking, run_id: str, rows: list[dict], root: Path = Path(".")) -> None:
    """Per-step training rows (``{"step": n, "loss": ..., ...}``) as ``train/<name>`` metrics."""
    import time

    from mlflow.entities import Metric

    mlflow_client, _ = client(tracking, root)
    now = int(time.time() * 1000)
    metrics = [Metric(f"train/{k}", float(v), now, row["step"]) for row in rows for k, v in row.items() if k != "step"]
    for start in range(0, len(metrics), 500):
        mlflow_client.log_batch(run_id, metrics=metrics[start : start + 500])
