"""Run a training stage as a real DeepSpeed job, and collect what it made.

Every training stage (teacher, align, mimic_dense, baseline, mimic_sparse,
preference, dft) calls :func:`run_job`, four steps: :func:`job_spec` says what
the job trains (a typed :class:`model.config.JobSpec`, written as ``job.json``),
:class:`ResumeState` decides between resuming and starting over, :func:`launch`
runs ``torchrun`` (or the ``deepspeed`` launcher) on :mod:`model.engine` with
``world_size`` ranks under the stage's MLflow run, failing with the tail of its
log on a non-zero exit, and :func:`collect` reads what the job measured.

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
from dataclasses import dataclass, field
from pathlib import Path

from model.config import TEACHER_TERMS, DPOParams, JobCache, JobData, JobSpec
from model.lifetime import die_with_parent
from model.teacher_cache import TeacherCache
from tasks import tracking
from tasks.common import (
    STAGING,
    StageFailure,
    StagePaths,
    files_sha256,
    read_jsonl,
    swap_in,
    write_json,
)
from tasks.params import REPO, Params, Tracking, TrainingParams

LOG_TAIL_BYTES = 6000
# Where DeepSpeed keeps the ops it compiles: one build per checkout, made by `make setup`
# (build_deepspeed_ops) and shared by every job, test and bench workspace.
TORCH_EXTENSIONS = REPO / ".cache" / "torch_extensions"


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
    dpo: DPOParams | None = None  # the preference stage's loss, whose reference is the teacher or the student itself
    seed: int | None = None
    # An earlier phase of a stage (the teacher's first): it writes no stage outputs, its metrics and
    # history go back to the stage, and a finished attempt of the same spec is reused, so a crash in
    # a later phase does not redo it.
    phase: bool = False
    earlier_history: list[dict] = field(default_factory=list)  # earlier phases' rows, before this job's in the loss curve


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


def job_spec(params: Params, paths: StagePaths, job: Job) -> JobSpec:
    """What the DeepSpeed job is told, from the params and the job alone (the cache's expected identity comes later)."""
    section = job.section
    cache = JobCache(path=str(paths.teacher_cache), top_k=section.teacher.top_k) if reads_cache(section) else None
    return JobSpec(
        stage=job.stage,
        init=str(job.init),
        # The job writes beside job.out; only a stage that finished, MLflow included, replaces it.
        out=str(job.out.with_name(job.out.name + STAGING)),
        run_dir=str(paths.runs / job.stage),
        seed=params.seed if job.seed is None else job.seed,
        train=TrainingParams.model_validate(section.model_dump(include=set(TrainingParams.model_fields))),
        data=JobData(files=[str(f) for f in job.data_files], image_root=str(paths.curated), preference=job.dpo is not None),
        deepspeed=deepspeed_config(section),
        teacher=str(job.teacher) if job.teacher else None,
        dpo=job.dpo,
        teacher_cache=cache,
    )


def _fingerprint(spec: JobSpec, inputs: list[Path]) -> str:
    """Spec plus the size and mtime of every input file: a changed input or param starts the stage over."""
    digest = hashlib.sha256(spec.model_dump_json().encode())
    for path in inputs:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            stat = f.stat()
            digest.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


@dataclass
class ResumeState:
    """A stage's resumable attempt in ``paths.runs/<stage>/``: the spec it ran, its MLflow run, whether it finished."""

    run_dir: Path
    fingerprint: str
    mlflow_run_id: str | None = None
    finished: bool = False

    @classmethod
    def open(cls, run_dir: Path, fingerprint: str, stage: str) -> ResumeState:
        """The interrupted attempt of this very spec, or a clean run folder (a finished or different attempt is cleared)."""
        file = run_dir / "state.json"
        saved = json.loads(file.read_text()) if file.exists() else {}
        if saved.get("fingerprint") == fingerprint and not saved.get("finished"):
            if (run_dir / "checkpoints" / "latest").exists():
                print(f"{stage}: an interrupted run of the same spec is in {run_dir}; resuming it", flush=True)
            return cls(run_dir, fingerprint, saved.get("mlflow_run_id"))
        if saved and not saved.get("finished"):
            print(f"{stage}: params or inputs changed since the interrupted attempt; starting over", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        return cls(run_dir, fingerprint)

    @staticmethod
    def done(run_dir: Path, fingerprint: str) -> bool:
        """Whether an attempt of this very spec finished in ``run_dir``."""
        file = run_dir / "state.json"
        saved = json.loads(file.read_text()) if file.exists() else {}
        return saved.get("fingerprint") == fingerprint and bool(saved.get("finished"))

    def save(self) -> None:
        (self.run_dir / "state.json").write_text(json.dumps({"fingerprint": self.fingerprint, "mlflow_run_id": self.mlflow_run_id, "finished": self.finished}))

    def finish(self) -> None:
        """The attempt's checkpoints have done their job: a later run of the stage starts clean."""
        shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
        self.finished = True
        self.save()


def _inputs(spec: JobSpec, paths: StagePaths) -> list[Path]:
    """The files the job reads that another stage made: a change to any starts the stage over."""
    external = [Path(p) for p in [spec.teacher, *spec.data.files] if p is not None]
    if spec.teacher_cache:
        external.append(paths.teacher_cache / "header.json")
    if not Path(spec.init).is_relative_to(spec.run_dir):
        external.append(Path(spec.init))
    return external


def _check_cache(spec: JobSpec, job: Job, paths: StagePaths) -> JobSpec:
    """The spec with the cache's expected identity, checked here before the job starts (and by the job, tokenizer too)."""
    if not spec.teacher_cache:
        return spec
    cache_spec = spec.teacher_cache.model_copy(update={"expect": cache_identity(job.teacher, job.data_files)})
    try:
        cache = TeacherCache(paths.teacher_cache)
        cache.check(cache_spec.expect)
    except ValueError as error:
        raise StageError(f"{job.stage}: {error}") from None
    if cache_spec.top_k > cache.header["top_k"]:
        raise StageError(f"{job.stage}.teacher.top_k is {cache_spec.top_k}, {paths.teacher_cache} holds top-{cache.header['top_k']}; run `dvc repro teacher_cache`")
    return spec.model_copy(update={"teacher_cache": cache_spec})


def launch(params: Params, stage: str, spec_path: Path, section: TrainingParams, state: ResumeState) -> str:
    """Run the job to its end under the stage's MLflow run (per-step rows forwarded as they land); returns the run id."""
    run_dir = state.run_dir
    # The job boots (imports, process group) while this process opens the MLflow run.
    running = RunningJob(spec_path, section, run_dir / "job.log")
    try:
        run_id = tracking.start_stage_run(params, stage, section.model_dump(mode="json"), run_id=state.mlflow_run_id)
    except BaseException:
        running.stop()
        raise
    state.mlflow_run_id = run_id
    state.save()
    forwarder = HistoryForwarder(params.tracking, run_id, run_dir / "history.jsonl")
    monitor = tracking.system_metrics(params.tracking, run_id)
    try:
        running.wait()
    except StageError:
        tracking.finish_run(params.tracking, run_id, {}, [run_dir / "job.log"], failed=True)
        raise
    finally:
        forwarder.stop()
        if monitor is not None:
            monitor.finish()
    return run_id


def collect(run_dir: Path) -> tuple[dict, list[dict]]:
    """The finished job's metrics (its result and the last logged row as ``final``) and its per-step history."""
    result = json.loads((run_dir / "result.json").read_text())
    history = list(read_jsonl(run_dir / "history.jsonl"))
    return {**result, "final": {k: v for k, v in history[-1].items() if k != "step"} if history else {}}, history


def run_job(
    params: Params, paths: StagePaths, job: Job, build_init: Callable[[Path], dict] | None = None, score: Callable[[Path], dict] | None = None
) -> dict:
    """Train ``job`` in a DeepSpeed job; returns the stage metrics, written once to ``metrics/<stage>.json``.

    ``build_init`` writes the starting checkpoint into ``job.init`` when the stage builds its own
    (the teacher from scratch, the student from the teacher) and returns what it measured doing so;
    it runs only when that folder is absent, so a resumed run starts from the very same weights, and
    its figures are kept beside them for the metrics of whichever attempt finishes. ``score`` measures the trained checkpoint
    (given its staged folder) before anything is written: its figures join the stage's metrics.
    """
    spec = job_spec(params, paths, job)
    if spec.teacher_cache and not (paths.teacher_cache / "header.json").exists():
        raise StageError(f"{job.stage}: teacher.mode is cached but {paths.teacher_cache} holds no cache; run `dvc repro teacher_cache`")
    run_dir = Path(spec.run_dir)
    inputs = _inputs(spec, paths)
    fingerprint = _fingerprint(spec, inputs)
    if job.phase and ResumeState.done(run_dir, fingerprint) and job.out.exists():
        print(f"{job.stage}: finished before with the same spec; reusing {job.out}", flush=True)
        return json.loads((run_dir / "metrics.json").read_text())
    state = ResumeState.open(run_dir, fingerprint, job.stage)
    built = run_dir / "init_metrics.json"
    if build_init is not None and not job.init.exists():
        write_json(built, build_init(job.init))
    for path in inputs + [job.init]:
        if not path.exists():
            raise StageError(f"{job.stage}: input {path} does not exist; run the stages before it (dvc repro)")
    spec = _check_cache(spec, job, paths)
    spec_path = run_dir / "job.json"
    spec_path.write_text(spec.model_dump_json(indent=2))
    run_id = launch(params, job.stage, spec_path, job.section, state)

    staged = Path(spec.out)
    metrics, history = collect(run_dir)
    if built.exists():
        metrics.update(json.loads(built.read_text()))
    if score is not None:
        metrics.update(score(staged))
    if job.phase:
        metrics["history"] = history
        write_json(run_dir / "metrics.json", metrics)
        tracking.finish_run(params.tracking, run_id, {k: v for k, v in metrics.items() if k != "history"}, [run_dir / "job.log"])
    else:
        offset = job.earlier_history[-1]["step"] if job.earlier_history else 0
        history = job.earlier_history + [{**row, "step": row["step"] + offset} for row in history]
        write_json(paths.metrics / f"{job.stage}.json", metrics)
        plot = plot_history(history, paths.plots / f"{job.stage}_loss.png", job.stage)
        write_json(paths.metrics / "history" / f"{job.stage}.json", history)  # the loss curve for `dvc plots`
        tracking.finish_run(params.tracking, run_id, metrics, [paths.metrics / f"{job.stage}.json", plot, run_dir / "job.log"], checkpoint=staged)
    swap_in(staged, job.out)
    state.finish()
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


def job_env(world_size: int = 1) -> dict[str, str]:
    """The environment a DeepSpeed job runs in."""
    env = dict(os.environ)
    # Each rank gets its share of the cores (the deepspeed launcher leaves this unset).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS.resolve()))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # This interpreter's tools first: DeepSpeed compiles with the ninja on PATH, and takes a build
    # by another ninja version for a changed one (the system's 1.11 against the venv's 1.13: 30 s).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def build_deepspeed_ops() -> None:
    """Compile DeepSpeed's CPU shared-memory op as the jobs will look for it (``make setup`` runs this).

    Otherwise the first job of a fresh checkout compiles it, about 30 s inside the pipeline's time.
    Where the accelerator is a GPU there is no such op and nothing is built.
    """
    os.environ.update(job_env())
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


class RunningJob:
    """The DeepSpeed job as a child process whose output streams to the console and ``log_path``."""

    def __init__(self, spec_path: Path, section: TrainingParams, log_path: Path):
        env = job_env(section.world_size)
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

    def __init__(self, tracking: Tracking, run_id: str, path: Path, every: float = 3.0):
        self.tracking, self.run_id, self.path, self.every = tracking, run_id, path, every
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
            tracking.log_steps(self.tracking, self.run_id, fresh)
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
