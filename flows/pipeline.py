"""The `distill-pipeline` Prefect flow: the DVC stages in order, as Prefect tasks.

Each task runs ``dvc repro -s <stage>``, so DVC decides what to skip and
versions every output, and ``dvc repro`` and the flow never drift: they run the
same stage commands. Only transient failures (a lost server, a network error,
DVC's repo lock) are retried; a training crash fails the task and the flow run.
Each stage publishes its metrics (and the data card, evaluation table and
review card) as Prefect artifacts.

Run it through the deployment (see README: services, deploy, run)::

    prefect deployment run distill-pipeline/local --watch

or directly, without a server: ``python -m flows.pipeline``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from tasks.params import REPO, ParamsError, Problem, load_layers, load_params, origin, read_params_file, resolve
from tasks.stages import dump, out_of_date, render

TRANSIENT_MARKERS = (
    "Unable to acquire lock",  # DVC: another dvc process holds the repo
    "Connection refused",
    "ConnectionError",
    "Max retries exceeded",
    "EndpointConnectionError",
    "Could not connect to the endpoint",
    "Temporary failure in name resolution",
    "Read timed out",
    "service unreachable",  # tinymod's own line for a dead MLflow or S3 endpoint
)
LOG_TAIL = 4000


class StageFailed(RuntimeError):
    """A stage exited non-zero for a reason retrying will not fix."""


class TransientStageError(RuntimeError):
    """A stage failed on something passing (a server or network); retried."""


def is_transient(output: str) -> bool:
    return any(marker in output for marker in TRANSIENT_MARKERS)


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except TransientStageError:
        return True
    except Exception:
        return False
    return False


@task(retries=2, retry_delay_seconds=[10, 30], retry_condition_fn=_retry_transient, task_run_name="{stage}")
def run_stage(stage: str, workdir: str, flow_run_id: str = "") -> dict:
    """``dvc repro -s <stage>`` in ``workdir``; the stage's metrics, published as an artifact."""
    logger = get_run_logger()
    env = dict(os.environ)
    # One tag groups this flow run's MLflow runs, whatever each stage logs.
    env["TINYMOD_PIPELINE_RUN"] = str(flow_run_id)
    # Stage commands call `python`: the interpreter running this flow, with its environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    process = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    output = process.stdout
    skipped = "didn't change, skipping" in output
    logger.info("%s: %s", stage, "unchanged, skipped by DVC" if skipped else "ran")
    # The stage's own summary lines ("mimic_dense: 500 steps in ...") reach the Prefect UI and
    # `--watch`, not only the worker's log; progress bars and library noise stay out.
    for line in stage_summary(output, stage):
        logger.info("%s", line)
    if process.returncode != 0:
        tail = output[-LOG_TAIL:]
        if is_transient(output):
            raise TransientStageError(f"stage {stage} hit a transient failure; retrying:\n{tail}")
        raise StageFailed(f"stage {stage} failed (dvc repro exited {process.returncode}):\n{tail}")
    metrics = publish(stage, Path(workdir))
    return {"stage": stage, "skipped": skipped, "metrics": metrics}


def stage_summary(output: str, stage: str) -> list[str]:
    """The lines a stage prints about itself: those starting with its name, without progress-bar redraws."""
    lines = (line.split("\r")[-1].strip() for line in output.splitlines())  # a bar's redraws share one line
    return [line for line in lines if line.startswith(f"{stage}: ") and not re.search(r"\d+%\|", line)]


def publish(stage: str, root: Path) -> dict:
    """The stage's metrics as a table artifact, and its report as a markdown artifact."""
    params = load_params(root / "params.yaml")
    metrics_dir = root / params.paths.metrics
    reports = root / params.paths.reports
    name = {"evaluate": "eval"}.get(stage, stage)
    path = metrics_dir / f"{name}.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    rows = [{"metric": k, "value": v} for k, v in _flat(metrics).items()]
    if rows:
        create_table_artifact(key=f"tinymod-{stage.replace('_', '-')}-metrics", table=rows[:200], description=f"metrics/{name}.json")
    report = {"curate": "data_card.md", "evaluate": "eval.md", "register": "review.md"}.get(stage)
    if report and (reports / report).exists():
        create_markdown_artifact(key=f"tinymod-{stage}-report", markdown=(reports / report).read_text(), description=f"reports/{report}")
    return metrics


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(root: Path, recipe: str | None, overrides: dict | None) -> list[str]:
    """Write ``recipe`` and dotted-key ``overrides`` into params.yaml (comments kept), validated first.

    They are real parameter changes, as ``dvc exp run -S`` makes them: DVC sees them and
    re-runs exactly the stages they concern. Nothing is written when the result is invalid.
    """
    from ruamel.yaml import YAML

    changes = dict(overrides or {})
    if recipe:
        changes["recipe"] = recipe
    if not changes:
        return []
    yaml = YAML()
    yaml.preserve_quotes = True
    path = root / "params.yaml"
    data = yaml.load(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if part not in node:
                node[part] = {}
            node = node[part]
        node[leaf] = value
    candidate = path.with_name(".params.flow.yaml")
    with candidate.open("w") as handle:
        yaml.dump(data, handle)
    try:
        layers = load_layers(read_params_file(candidate), root, "params.yaml")
        resolved = resolve(layers).model_dump(mode="json")
    finally:
        text = candidate.read_text()
        candidate.unlink()
    # A preset wins over params.yaml: an override it would mask must not pass silently.
    shadowed = []
    for dotted, value in changes.items():
        node = resolved
        for part in dotted.split("."):
            node = node[part]
        if node != value:
            shadowed.append(Problem(dotted, f"the override {value!r} is masked: {origin(dotted, layers)} sets {node!r}, and presets win over params.yaml"))
    if shadowed:
        raise ParamsError(shadowed)
    path.write_text(text)
    return [f"{k}={v}" for k, v in changes.items()]


class Approval(RunInput):
    approve: bool = False
    """Move `champion` to this candidate."""
    note: str = ""
    """Why (kept as a tag on the model version)."""


@flow(name="distill-pipeline", log_prints=True)
def distill_pipeline(recipe: str | None = None, overrides: dict | None = None, promote: bool = True, workdir: str = str(REPO)) -> dict:
    """Every stage of the pipeline in order; see the module docstring.

    Args:
        recipe: recipes/<name>.yaml to use (written to params.yaml), e.g. llava-kd.
        overrides: dotted params keys and values, e.g. {"mimic_dense.steps": 500}.
        promote: move `champion` when the gate passes (False: record the verdict only).
        workdir: the tinymod checkout to run in.
    """
    logger = get_run_logger()
    root = Path(workdir)
    changes = apply_overrides(root, recipe, {**(overrides or {}), **({} if promote else {"register.promote": False})})
    if changes:
        logger.info("params.yaml changed: %s", ", ".join(changes))
    params = load_params(root / "params.yaml")  # every problem reported before any work
    if out_of_date(params, root):  # a recipe override changes which stages run: dvc.yaml follows it
        (root / "dvc.yaml").write_text(dump(render(params, root)))
        logger.info("dvc.yaml rendered for recipe %s: %s", params.recipe, ", ".join(params.pipeline))
    flow_run_id = str(runtime.flow_run.id)
    results = {}
    for stage in params.pipeline:
        results[stage] = run_stage(stage, workdir, flow_run_id)
    registered = results["register"]["metrics"]
    if registered.get("awaiting_approval"):
        review = (root / params.paths.reports / "review.md").read_text()
        decision = pause_flow_run(
            wait_for_input=Approval.with_initial_data(description=review),
            timeout=params.register.approval_timeout_s,
            key=f"approve-{registered['model_name']}-{registered['version']}",
        )
        if decision.approve:
            promote_candidate(workdir, decision.note)
            logger.info("champion moved to version %s after review", registered["version"])
        else:
            logger.info("reviewer declined version %s; it stays candidate (%s)", registered["version"], decision.note)
    return {stage: {"skipped": r["skipped"]} for stage, r in results.items()}


@task
def promote_candidate(workdir: str, note: str) -> None:
    subprocess.run([sys.executable, "-m", "tasks.register", "promote", "--note", note], cwd=workdir, check=True)


if __name__ == "__main__":
    distill_pipeline()
