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
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model.config import TEACHER_TERMS
from model.lifetime import die_with_parent
from model.teacher_cache import TeacherCache
from tasks import tracking
from tasks.common import STAGING, StageFailure, StagePaths, files_sha256, read_jsonl, swap_in, write_json
from tasks.params import REPO, Params, TrainingParams

LOG_TAIL_BYTES = 6000


class StageError(StageFailure):
    """A stage failed; the message says why and what to do."""


@dataclass
class Job:
    """What one training stage trains, from what, on what (``seed`` None: the global seed)."""

    stage: str
    section: TrainingParams
    init: Path
    out: Path
    data_files: list[Path]
    teacher: Path | None = None
    reference: str | None = None  # preference stage: "teacher" or "self"
    dpo: dict | None = None
    seed: int | None = None

    @property
    def preference(self) -> bool:
        return self.reference is not None


def reads_cache(section: TrainingParams) -> bool:
    """Whether a stage reads the teacher cache: mode cached and a loss term that needs the teacher."""
    return section.teacher.mode == "cached" and any(getattr(section.loss, term) for term in TEACHER_TERMS)


def cache_identity(teacher: Path, data_files: list[Path]) -> dict:
    """What a teacher cache must have been made from: the teacher's weights and each data file.

    The tokenizer is the job's to check (it loads it anyway): this runs before the job starts and
    imports neither torch nor transformers.
    """
    return {"teacher_sha256": files_sha256(sorted(teacher.glob("*.safetensors"))), "data": {f.name: files_sha256([f]) for f in data_files}}


def deepspeed_config(section: TrainingParams) -> dict:
    """``infra/deepspeed/zero<N>.json`` with the batch geometry and optimizer of ``section``.

    Precision is the job's choice (bf16 where it finds a GPU, fp32 on CPU).
    """
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
    return config


def _fingerprint(spec: dict, inputs: list[Path]) -> str:
    """Spec plus the size and mtime of every input file: a changed input or param starts the stage over."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
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
    section = job.section
    run_dir = prepare_run(paths, job.stage)
    # The job writes beside job.out; only a stage that finished, MLflow included, replaces it.
    staging = job.out.with_name(job.out.name + STAGING)
    spec = {
        "stage": job.stage,
        "init": str(job.init),
        "out": str(staging),
        "teacher": str(job.teacher) if job.teacher else None,
        "reference": job.reference,
        "dpo": job.dpo,
        "run_dir": str(run_dir),
        "seed": params.seed if job.seed is None else job.seed,
        "chunk_size": section.chunk_size,
        "train": section.model_dump(mode="json"),
        "data": {
            "files": [str(f) for f in job.data_files],
            "image_root": str(paths.curated),
            "fraction": section.fraction,
            "preference": job.preference,
        },
        "deepspeed": deepspeed_config(section),
        "teacher_cache": None,
    }
    if reads_cache(section):
        if not (paths.teacher_cache / "header.json").exists():
            raise StageError(f"{job.stage}: teacher.mode is cached but {paths.teacher_cache} holds no cache; run `dvc repro teacher_cache`")
        spec["teacher_cache"] = {"path": str(paths.teacher_cache), "top_k": section.teacher.top_k}
    external = [p for p in [job.teacher, *job.data_files] if p is not None]
    if spec["teacher_cache"]:
        external.append(paths.teacher_cache / "header.json")
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

    if spec["teacher_cache"]:
        # Checked here, before the job starts, and by the job (the tokenizer too) before its first step.
        spec["teacher_cache"]["expect"] = cache_identity(job.teacher, job.data_files)
        try:
            cache = TeacherCache(paths.teacher_cache)
            cache.check(spec["teacher_cache"]["expect"])
        except ValueError as error:
            raise StageError(f"{job.stage}: {error}") from None
        if section.teacher.top_k > cache.header["top_k"]:
            raise StageError(f"{job.stage}.teacher.top_k is {section.teacher.top_k}, {paths.teacher_cache} holds top-{cache.header['top_k']}; run `dvc repro teacher_cache`")
    spec_path = run_dir / "job.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    # The job boots (imports, process group) while this process opens the MLflow run.
    running = RunningJob(spec_path, section, run_dir / "job.log")
    section_dict = {**spec["train"], "dpo": job.dpo} if job.dpo else spec["train"]
    try:
        run_id = tracking.start_stage_run(params, job.stage, section_dict, run_id=state.get("mlflow_run_id"))
    except BaseException:
        running.stop()
        raise
    state["mlflow_run_id"] = run_id
    state_file.write_text(json.dumps(state))
    forwarder = HistoryForwarder(params, run_id, run_dir / "history.jsonl")
    monitor = tracking.system_metrics(params, run_id)
    try:
        running.wait()
    except StageError:
        tracking.finish_run(params, run_id, {}, [run_dir / "job.log"], failed=True)
        raise
    finally:
        forwarder.stop()
        if monitor is not None:
            monitor.finish()
    result = json.loads((run_dir / "result.json").read_text())
    history = list(read_jsonl(run_dir / "history.jsonl"))
    metrics = {**result, "final": {k: v for k, v in history[-1].items() if k != "step"} if history else {}}
    write_json(paths.metrics / f"{job.stage}.json", metrics)
    plot = plot_history(history, paths.plots / f"{job.stage}_loss.png", job.stage)
    write_json(paths.metrics / "history" / f"{job.stage}.json", history)  # the loss curve for `dvc plots`
    tracking.finish_run(params, run_id, metrics, [paths.metrics / f"{job.stage}.json", plot, run_dir / "job.log"], checkpoint=staging)
    swap_in(staging, job.out)
    # Finished: the resumable state has done its job and a later run starts clean.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    state["finished"] = True
    state_file.write_text(json.dumps(state))
    return metrics


def launch_command(spec_path: Path, section: TrainingParams) -> list[str]:
    if section.launcher == "deepspeed":
        # With a hostfile the launcher takes every slot it lists (world_size is then theirs to match).
        placement = ["--hostfile", section.hostfile] if section.hostfile else ["--num_gpus", str(section.world_size)]
        return [
            sys.executable, "-m", "deepspeed.launcher.runner", *placement,
            "--master_port", str(_free_port()), "--module", "model.engine", str(spec_path),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc_per_node", str(section.world_size),
        "-m", "model.engine", str(spec_path),
    ]  # fmt: skip


class RunningJob:
    """The DeepSpeed job as a child process whose output streams to the console and ``log_path``."""

    def __init__(self, spec_path: Path, section: TrainingParams, log_path: Path):
        env = dict(os.environ)
        # Each rank gets its share of the cores (the deepspeed launcher leaves this unset).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // section.world_size)))
        env.setdefault("TORCH_EXTENSIONS_DIR", str((REPO / ".cache" / "torch_extensions").resolve()))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        self.command = launch_command(spec_path, section)
        self.log_path = log_path
        self.tail: deque[bytes] = deque()
        # torchrun dies with the stage (SIGTERM: it stops its ranks, which also die with it).
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            preexec_fn=lambda: die_with_parent(signal.SIGTERM),  # noqa: PLW1509 - only a prctl call runs between fork and exec
        )
        self.reader = threading.Thread(target=self._stream, daemon=True)
        self.reader.start()

    def _stream(self) -> None:
        size = 0
        assert self.process.stdout is not None
        with self.log_path.open("ab") as log:
            while chunk := os.read(self.process.stdout.fileno(), 4096):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
                self.tail.append(chunk)
                size += len(chunk)
                while size - len(self.tail[0]) > LOG_TAIL_BYTES:
                    size -= len(self.tail.popleft())

    def wait(self) -> None:
        """Block until the job ends; StageError with the tail of its log on a non-zero exit."""
        code = self.process.wait()
        self.reader.join()
        if code != 0:
            text = b"".join(self.tail).decode("utf-8", errors="replace")[-LOG_TAIL_BYTES:]
            raise StageError(
                f"the DeepSpeed job exited with code {code}: {' '.join(self.command)}\n"
                f"--- last lines of {self.log_path} ---\n{text}\n--- end ---\n"
                "Fix the cause and re-run the stage: it resumes from its last checkpoint."
            )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


class HistoryForwarder:
    """Logs the job's per-step rows (``history.jsonl``) to the stage's MLflow run as they land."""

    def __init__(self, params: Params, run_id: str, path: Path, every: float = 3.0):
        self.params, self.run_id, self.path, self.every = params, run_id, path, every
        self.sent = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.wait(self.every):
            self._send()

    def _send(self) -> None:
        if not self.path.exists():
            return
        rows = list(read_jsonl(self.path))
        fresh = [row for row in rows if row["step"] > self.sent]
        if fresh:
            tracking.log_steps(self.params, self.run_id, fresh)
            self.sent = fresh[-1]["step"]

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self._send()


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
    # One throughput, the whole run's: the final row's rates are only its last logging window's.
    terms = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k not in ("lr", "samples_per_second", "tokens_per_second"))
    return (
        f"{metrics['steps']} steps in {metrics['seconds']:.0f} s ({metrics['samples_per_second']:.1f} samples/s);"
        f" final {terms}; {metrics['trainable']:,} of {metrics['total']:,} parameters trained"
    )
