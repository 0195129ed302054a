"""Run a training stage as a real DeepSpeed job, and collect what it made.

Every training stage (teacher, align, mimic_dense, mimic_sparse, preference)
calls :func:`run_job`: it writes the job spec, starts ``torchrun`` (or the
``deepspeed`` launcher) on :mod:`model.engine` with ``world_size`` ranks, streams
the job's output, and fails with the tail of its log on a non-zero exit.

Resumable state lives in ``paths.runs/<stage>/`` (``.cache/runs`` by default):
re-running a stage after a crash continues from its last checkpoint, as long as
the spec (params, inputs) is unchanged; a changed spec starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks import tracking
from tasks.common import StageFailure, StagePaths, read_jsonl, write_json
from tasks.params import REPO, Params, TrainingParams

LOG_TAIL_BYTES = 6000


class StageError(StageFailure):
    """A stage failed; the message says why and what to do."""


@dataclass
class Job:
    """What one training stage trains, from what, on what."""

    stage: str
    section: TrainingParams
    init: Path
    out: Path
    data_files: list[Path]
    teacher: Path | None = None
    reference: str | None = None  # preference stage: "teacher" or "self"
    dpo: dict | None = None

    @property
    def preference(self) -> bool:
        return self.reference is not None


def deepspeed_config(section: TrainingParams, cuda: bool) -> dict:
    """``infra/deepspeed/zero<N>.json`` with the batch geometry, optimizer and precision of ``section``."""
    template = REPO / "infra" / "deepspeed" / f"zero{section.zero_stage}.json"
    config = json.loads(template.read_text())
    per_rank = section.batch_size // section.world_size
    micro = min(section.micro_batch_size, per_rank)
    config.update(
        train_batch_size=section.batch_size,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=per_rank // micro,
        gradient_clipping=section.grad_clip,
        optimizer={
            "type": "AdamW",
            # torch's AdamW: no JIT-built CPU Adam op, and fine for the sizes tinymod trains.
            "params": {"lr": section.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": section.weight_decay, "torch_adam": True},
        },
    )
    if cuda:
        config["bf16"] = {"enabled": True}  # fp32 on CPU: DeepSpeed's CPU path has no fp16
    return config


def _fingerprint(spec: dict, inputs: list[Path]) -> str:
    """Spec plus the size and mtime of every input file: a changed input or param starts the stage over."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in spec.items() if k != "mlflow"}, sort_keys=True).encode())
    for path in inputs:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            stat = f.stat()
            digest.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def prepare_run(paths: StagePaths, stage: str) -> Path:
    run_dir = paths.runs / stage
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_job(params: Params, paths: StagePaths, job: Job, build_init: Callable[[Path], None] | None = None) -> dict:
    """Train ``job`` in a DeepSpeed job; returns the stage metrics (also written to ``metrics/<stage>.json``).

    ``build_init`` writes the starting checkpoint into ``job.init`` when the stage builds its own
    (the teacher from scratch, the student from the teacher); it runs only when that folder is absent,
    so a resumed run starts from the very same weights.
    """
    import torch

    section = job.section
    run_dir = prepare_run(paths, job.stage)
    spec = {
        "stage": job.stage,
        "init": str(job.init),
        "out": str(job.out),
        "teacher": str(job.teacher) if job.teacher else None,
        "reference": job.reference,
        "dpo": job.dpo,
        "run_dir": str(run_dir),
        "seed": params.seed,
        "chunk_size": section.chunk_size,
        "train": section.model_dump(mode="json"),
        "data": {
            "files": [str(f) for f in job.data_files],
            "image_root": str(paths.curated),
            "fraction": section.fraction,
            "preference": job.preference,
        },
        "deepspeed": deepspeed_config(section, torch.cuda.is_available()),
    }
    external = [p for p in [job.teacher, *job.data_files] if p is not None]
    if not job.init.is_relative_to(run_dir):
        external.append(job.init)
    fingerprint = _fingerprint(spec, external)
    state_file = run_dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("fingerprint") != fingerprint or state.get("finished"):
        if state and not state.get("finished"):
            print(f"{job.stage}: params or inputs changed since the interrupted attempt; starting over", flush=True)
        shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        state = {"fingerprint": fingerprint}
    elif (run_dir / "checkpoints" / "latest").exists():
        print(f"{job.stage}: an interrupted run of the same spec is in {run_dir}; resuming it", flush=True)
    if build_init is not None and not job.init.exists():
        build_init(job.init)
    for path in external + [job.init]:
        if not path.exists():
            raise StageError(f"{job.stage}: input {path} does not exist; run the stages before it (dvc repro)")

    section_dict = {**spec["train"], "dpo": job.dpo} if job.dpo else spec["train"]
    run_id = tracking.start_stage_run(params, job.stage, section_dict, run_id=state.get("mlflow_run_id"))
    state["mlflow_run_id"] = run_id
    state_file.write_text(json.dumps(state))
    spec["mlflow"] = {"uri": tracking.tracking_uri(params.tracking, Path(".")), "run_id": run_id}
    spec_path = run_dir / "job.json"
    spec_path.write_text(json.dumps(spec, indent=2))

    try:
        launch(spec_path, section, run_dir / "job.log")
    except StageError:
        tracking.finish_run(params, run_id, {}, [run_dir / "job.log"], failed=True)
        raise
    result = json.loads((run_dir / "result.json").read_text())
    history = list(read_jsonl(run_dir / "history.jsonl"))
    metrics = {**result, "final": {k: v for k, v in history[-1].items() if k != "step"} if history else {}}
    write_json(paths.metrics / f"{job.stage}.json", metrics)
    plot = plot_history(history, paths.plots / f"{job.stage}_loss.png", job.stage)
    tracking.finish_run(params, run_id, metrics, [paths.metrics / f"{job.stage}.json", plot, run_dir / "job.log"])
    # Finished: the resumable state has done its job and a later run starts clean.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    state["finished"] = True
    state_file.write_text(json.dumps(state))
    return metrics


def launch_command(spec_path: Path, section: TrainingParams) -> list[str]:
    if section.launcher == "deepspeed":
        return [
            sys.executable, "-m", "deepspeed.launcher.runner",
            "--num_gpus", str(section.world_size), "--master_port", str(_free_port()),
            "--module", "model.engine", str(spec_path),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc_per_node", str(section.world_size),
        "-m", "model.engine", str(spec_path),
    ]  # fmt: skip


def launch(spec_path: Path, section: TrainingParams, log_path: Path) -> None:
    """Run the job, streaming its output to the console and ``log_path``; StageError with the log's tail on failure."""
    env = dict(os.environ)
    # Each rank gets its share of the cores (the deepspeed launcher leaves this unset).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // section.world_size)))
    env.setdefault("TORCH_EXTENSIONS_DIR", str((REPO / ".cache" / "torch_extensions").resolve()))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    command = launch_command(spec_path, section)
    tail: deque[bytes] = deque()
    size = 0
    with log_path.open("ab") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as process:
        assert process.stdout is not None
        while chunk := os.read(process.stdout.fileno(), 4096):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
            tail.append(chunk)
            size += len(chunk)
            while size - len(tail[0]) > LOG_TAIL_BYTES:
                size -= len(tail.popleft())
        code = process.wait()
    if code != 0:
        text = b"".join(tail).decode("utf-8", errors="replace")[-LOG_TAIL_BYTES:]
        raise StageError(
            f"the DeepSpeed job exited with code {code}: {' '.join(command)}\n"
            f"--- last lines of {log_path} ---\n{text}\n--- end ---\n"
            "Fix the cause and re-run the stage: it resumes from its last checkpoint."
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot_history(history: list[dict], out: Path, stage: str) -> Path:
    """Every logged loss term against the step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"step", "lr"}
    names = [k for k in (history[0] if history else {}) if k not in skip]
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = max(1, min(4, len(names)))
    rows = max(1, -(-len(names) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.6 * rows), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(steps, [h[name] for h in history])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"{stage}: training", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def stage_files(paths: StagePaths, splits: list[str]) -> list[Path]:
    return [paths.split(s) for s in splits]


def train_summary(metrics: dict) -> str:
    """One line for the console after a training stage."""
    final = metrics.get("final", {})
    terms = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "lr")
    return (
        f"{metrics['steps']} steps in {metrics['seconds']:.0f} s ({metrics['samples_per_second']:.1f} samples/s);"
        f" final {terms}; {metrics['trainable']:,} of {metrics['total']:,} parameters trained"
    )
