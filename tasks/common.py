"""Small helpers every stage uses: JSON lines, metrics files, stage paths."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from model.errors import CheckpointError, TinymodError
from model.jsonl import read_jsonl  # noqa: F401 - the stages read JSONL through tasks.common
from tasks.params import STUDENT_STAGES, Params


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: Path, data: dict | list) -> None:
    """Write atomically so a crash never leaves half a metrics file for DVC to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def files_sha256(files: Iterable[Path]) -> str:
    """SHA-256 over the bytes of ``files``, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(folder: Path) -> str:
    """SHA-256 over a checkpoint's ``*.safetensors`` files in name order."""
    return files_sha256(sorted(Path(folder).glob("*.safetensors")))


def check_pinned_weights(folder: Path, pinned: str | None, key: str, source_key: str, remake: str = "") -> str:
    """The weights' SHA-256; refuses them when the params' ``key`` pins other weights (None pins nothing)."""
    digest = weights_sha256(folder)
    if pinned and digest != pinned:
        raise CheckpointError(
            f"{folder}: weights have SHA-256 {digest}, {key} expects {pinned}. The checkpoint changed since it was "
            f"pinned, or {source_key} now names another one: restore it{remake}, or set {key} to the new hash (or null, to pin nothing)."
        )
    return digest


class StagePaths:
    """Where stages read and write, per DESIGN.md's output contract."""

    def __init__(self, params: Params, root: Path | str = "."):
        root = Path(root)
        self.root = root
        p = params.paths
        self.data = root / p.data
        self.world = self.data / "world"
        self.curated = self.data / "curated"
        self.probes = self.curated / "probes"
        self.models = root / p.models
        self.tokenizer = self.models / "tokenizer"
        self.teacher = self.models / "teacher"
        self.teacher_cache = self.data / "teacher_cache"
        self.metrics = root / p.metrics
        self.reports = root / p.reports
        self.plots = self.reports / "plots"
        self.runs = root / p.runs

    def split(self, name: str) -> Path:
        return self.curated / f"{name}.jsonl"

    def student(self, name: str) -> Path:
        return self.models / f"student_{name}"


TRAINED = {"loss": ("final", "loss"), "seconds": ("seconds",)}
# What `dvc metrics show` prints per stage: a few numbers under names shared across stages, so the
# table has a dozen columns, not hundreds. The full figures stay in metrics/<stage>.json.
HEADLINES: dict[str, dict[str, tuple]] = {
    "curate": {"kept": ("kept",), "rejected": ("rejected",)},
    "teacher": {"vqa": ("probes", "vqa", "accuracy"), "pope_f1_adv": ("probes", "pope_adversarial", "f1"), "chair_i": ("probes", "caption", "chair_i")},
    **{stage: TRAINED for stage, role in STUDENT_STAGES.items() if role.trains},
    "upcycle": {"logit_diff": ("max_abs_logit_difference",)},
    "teacher_cache": {"seconds": ("seconds",)},  # records, bytes and B/token: metrics/teacher_cache.json
    "evaluate": {"vqa": ("tasks", "tinymod_vqa", "vqa_accuracy"), "pope_f1_adv": ("tasks", "tinymod_pope_adversarial", "pope_f1"), "chair_i": ("tasks", "tinymod_caption", "chair_i")},
    "register": {"version": ("version",), "gate_passed": ("gate_passed",)},
}


def headline(stage: str, metrics: dict, params: Params) -> dict:
    """The stage's few headline numbers (evaluate: the registered model's), rounded for a terminal."""
    if stage == "evaluate":
        metrics = metrics.get("models", {}).get(params.registered_model, {})
    out = {}
    for key, path in HEADLINES.get(stage, {}).items():
        value = metrics
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            out[key] = round(value, 4) if isinstance(value, float) else value
    return out


def run_stage(name: str, work, doc: str | None, argv: list[str] | None = None, summary=None, headline_out: bool = True) -> int:
    """The thin ``main()`` of every stage: parse ``--params``, validate, run ``work(params, paths)``.

    Known failures (bad params, a failed job, a bad checkpoint) print one clear message and
    exit 1; ``summary(metrics)`` returns the line printed on success. A stage (``headline_out``)
    also writes ``metrics/headline/<name>.json``, what ``dvc metrics show`` prints.
    """
    import argparse
    import sys

    from tasks.params import load_params

    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        check_graph(name, params, args.params.resolve().parent)
        paths = StagePaths(params)
        metrics = work(params, paths)
        if headline_out and name in HEADLINES:
            write_json(paths.metrics / "headline" / f"{name}.json", headline(name, metrics, params))
    except TinymodError as error:
        print(f"{name} failed: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        # A service that fails mid-stage (MLflow, S3): one line naming it, not a traceback.
        service = {"mlflow": "MLflow (tracking.uri)", "botocore": "S3", "boto3": "S3"}.get(type(error).__module__.split(".")[0])
        if service is None:
            raise
        print(f"{name} failed: {service} error (service unreachable or refusing): {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if summary is not None:
        print(f"{name}: {summary(metrics)}")
    return 0


class StageFailure(TinymodError, RuntimeError):
    """Base of every error a stage reports as a clean failure (message, exit 1), not a traceback."""


def check_graph(name: str, params, root: Path) -> None:
    """Refuse a stage the recipe does not run, or a dvc.yaml rendered for other params, before any work."""
    from tasks.stages import out_of_date

    if name in STUDENT_STAGES and name not in params.pipeline:
        raise StageFailure(f"recipe {params.recipe} has no stage {name} (its stages: {', '.join(params.pipeline)})")
    why = out_of_date(params, root)
    if why:
        raise StageFailure(why)


STAGING = ".staging"  # a stage's outputs are built beside their final names and renamed into place on success


def swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging`` with renames: at every moment one complete version exists."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    if old.exists():
        shutil.rmtree(old)
