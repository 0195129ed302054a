"""Stage `evaluate`: the teacher and every student through lmms-eval.

Each checkpoint in ``evaluate.models`` is loaded with plain transformers inside
tinymod's lmms-eval model and scored on ``evaluate.tasks``: the embedded probes
(``tinymod_pope_{random,popular,adversarial}``, ``tinymod_vqa``,
``tinymod_caption``, shipped in ``model/lmms_tasks/``) or any lmms-eval task
(pope, mme, gqa, ...) whose data is reachable. Any evaluation error fails the
stage. Writes ``metrics/eval.json``, ``reports/eval.md`` (a table with deltas
to the teacher) and ``reports/plots/eval_*.png``, and logs them to MLflow.

Run: ``python -m tasks.evaluate [--params params.yaml]``
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from tasks import tracking
from tasks.common import StageFailure, StagePaths, run_stage, write_json
from tasks.params import CHECKPOINTS, REPO, Params

TASKS_DIR = REPO / "model" / "lmms_tasks"
# The figures a reviewer compares first: (label, task, metric, higher is better).
HEADLINE = [
    ("VQA acc", "tinymod_vqa", "vqa_accuracy", True),
    ("POPE F1 rand", "tinymod_pope_random", "pope_f1", True),
    ("POPE F1 pop", "tinymod_pope_popular", "pope_f1", True),
    ("POPE F1 adv", "tinymod_pope_adversarial", "pope_f1", True),
    # F1 rewards a yes-bias; accuracy says whether the model looks at all (0.5 is chance).
    ("POPE acc rand", "tinymod_pope_random", "pope_accuracy", True),
    ("POPE acc adv", "tinymod_pope_adversarial", "pope_accuracy", True),
    ("yes-ratio adv", "tinymod_pope_adversarial", "pope_yes_ratio", None),
    ("CHAIR-i", "tinymod_caption", "chair_i", False),
    ("CHAIR-s", "tinymod_caption", "chair_s", False),
    ("object recall", "tinymod_caption", "object_recall", True),
    # Captions of images with an anchor but not its partner that name the partner anyway.
    ("partner halluc.", "tinymod_caption", "partner_hallucination", False),
]
POPE_SPLITS = ("random", "popular", "adversarial")


class EvaluationError(StageFailure):
    """lmms-eval could not score a model on a task; nothing is reported as if it had."""


def evaluate(params: Params, paths: StagePaths) -> dict:
    import datasets
    from lmms_eval.tasks import TaskManager
    from loguru import logger

    # lmms-eval logs through loguru from DEBUG up (every yaml it skips) and datasets draws a bar per
    # split it loads: a stage shows warnings and its own lines.
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    datasets.disable_progress_bars()
    e = params.evaluate
    _check_inputs(params, paths)
    tracking.client(params.tracking)  # a dead tracking server fails now, not after the evaluation
    os.environ["TINYMOD_CURATED"] = str(paths.curated)
    stock = any(not t.startswith("tinymod_") for t in e.tasks)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=stock)
    unknown = [t for t in e.tasks if t not in manager.all_tasks]
    if unknown:
        raise EvaluationError(f"evaluate.tasks: unknown lmms-eval tasks {unknown}; tinymod ships {sorted(t for t in manager.all_tasks if t.startswith('tinymod_'))}")
    runs = local_copies(e.local_data, manager, paths.root / ".cache" / "lmms_local_tasks")
    if runs:
        manager = TaskManager(include_path=[str(TASKS_DIR), str(paths.root / ".cache" / "lmms_local_tasks")], include_defaults=stock)
    started = time.time()
    models = {name: score_checkpoint(paths.models / CHECKPOINTS[name], list(e.tasks), manager, params, runs) for name in params.evaluated_models}
    metrics = {"models": models, "tasks": list(e.tasks), "limit": e.limit, "seconds": round(time.time() - started, 1)}
    write_json(paths.metrics / "eval.json", metrics)
    report = write_report(metrics, paths)
    plots = write_plots(metrics, paths)
    run_id = tracking.start_stage_run(params, "evaluate", params.evaluate.model_dump(mode="json"))
    tracking.finish_run(params.tracking, run_id, {"models": {n: m["tasks"] for n, m in models.items()}}, [paths.metrics / "eval.json", report, *plots])
    return metrics


def local_copies(local_data: dict[str, str], manager, folder: Path) -> dict[str, str]:
    """Task -> the name of a copy of that stock lmms-eval task reading its dataset from ``local_data``.

    The copy includes the stock YAML (its prompts, parsing and metrics unchanged) and replaces only
    ``dataset_path`` (a hub id) with the local folder. Stock tasks win name clashes in lmms-eval's
    index, so the copy has its own name; results are reported under the task's.
    """
    if folder.exists():
        shutil.rmtree(folder)
    if not local_data:
        return {}
    folder.mkdir(parents=True)
    runs = {}
    for task, data in local_data.items():
        stock_yaml = Path(manager.task_index[task]["yaml_path"]).resolve()
        name = f"tinymod_local_{task}"
        config = {"include": str(stock_yaml), "task": name, "dataset_path": str(Path(data).resolve()), "dataset_kwargs": {}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
        runs[task] = name
    return runs


def _check_inputs(params: Params, paths: StagePaths) -> None:
    for task, data in params.evaluate.local_data.items():
        if not Path(data).exists():
            raise EvaluationError(f"evaluate.local_data.{task}: {data} does not exist; give a local copy of the task's dataset (its parquet files)")
    missing = [name for name in params.evaluated_models if not (paths.models / CHECKPOINTS[name] / "config.json").exists()]
    if missing:
        raise EvaluationError(f"evaluate.models: no checkpoint for {missing} under {paths.models}; run the stages that make them (dvc repro)")
    if any(t.startswith("tinymod_") for t in params.evaluate.tasks):
        # The shipped task YAMLs read the probes from data/curated/probes relative to the repo.
        if Path(paths.probes).resolve() != Path("data/curated/probes").resolve():
            raise EvaluationError(
                f"the tinymod_* lmms-eval tasks read data/curated/probes, but paths.data puts the probes in {paths.probes}; "
                "run from the repo root with paths.data: data"
            )


def score_checkpoint(checkpoint: Path, tasks: list[str], manager, params: Params, runs: dict[str, str] | None = None) -> dict:
    """lmms-eval scores of one checkpoint: ``{"tasks": {task: {metric: value}}, "parameters", "decode_tokens_per_second"}``.

    ``runs`` names the task actually run for a task (a local-data copy, see :func:`local_copies`)."""
    from lmms_eval.evaluator import simple_evaluate

    from model.lmms_model import TinymodLlava
    from model.upcycle import parameter_counts

    e = params.evaluate
    runs = runs or {}
    print(f"evaluate: {checkpoint}", flush=True)
    lm = TinymodLlava(pretrained=str(checkpoint), batch_size=e.batch_size, max_new_tokens=e.max_new_tokens)
    try:
        results = simple_evaluate(
            model=lm, tasks=[runs.get(t, t) for t in tasks], limit=e.limit, task_manager=manager, log_samples=False, verbosity="WARNING", bootstrap_iters=0
        )
    except Exception as error:  # lmms-eval raises many kinds; each one means no score
        raise EvaluationError(f"lmms-eval failed on {checkpoint}: {type(error).__name__}: {error}") from error
    if not results or "results" not in results:
        raise EvaluationError(f"lmms-eval returned no results for {checkpoint}")
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        raw = results["results"].get(runs.get(task, task))
        if raw is None:
            raise EvaluationError(f"lmms-eval returned no scores for task {task} on {checkpoint}")
        scores[task] = {
            key.split(",")[0]: float(value)
            for key, value in raw.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    out = {
        "tasks": scores,
        "parameters": parameter_counts(lm.answerer.model),
        "decode_tokens_per_second": round(lm.answerer.tokens_per_second, 1),
    }
    del lm
    gc.collect()
    return out


def headline(model_scores: dict) -> dict[str, float]:
    """The HEADLINE figures of one model that its tasks produced."""
    out = {}
    for label, task, metric, _ in HEADLINE:
        value = model_scores["tasks"].get(task, {}).get(metric)
        if value is not None:
            out[label] = value
    return out


def write_report(metrics: dict, paths: StagePaths) -> Path:
    models = metrics["models"]
    teacher = headline(models["teacher"]) if "teacher" in models else {}
    labels = [label for label, *_ in HEADLINE if any(label in headline(m) for m in models.values())]
    lines = [
        "# Evaluation",
        "",
        f"lmms-eval on {', '.join(metrics['tasks'])}" + (f" (at most {metrics['limit']} documents per task)." if metrics["limit"] else "."),
        "Deltas are to the teacher; arrows say which way is better.",
        "",
        "POPE answers that said neither yes nor no count as yes (LLaVA's eval_pope.py); the unparsed column",
        "gives how many there were on the random / popular / adversarial splits.",
        "",
        "| model | " + " | ".join(labels) + " | POPE unparsed | active / total params | decode tok/s |",
        "|---|" + "---:|" * len(labels) + "---:|---:|---:|",
    ]
    better = {label: up for label, _, _, up in HEADLINE}
    for name, scores in models.items():
        figures = headline(scores)
        cells = []
        for label in labels:
            value = figures.get(label)
            if value is None:
                cells.append("")
                continue
            cell = f"{value:.3f}"
            if name != "teacher" and label in teacher:
                cell += f" ({_delta(value - teacher[label], better[label])})"
            cells.append(cell)
        p = scores["parameters"]
        unparsed = " / ".join(_unparsed(scores, split) for split in POPE_SPLITS)
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {unparsed} | {p['active']:,} / {p['total']:,} | {scores['decode_tokens_per_second']:.0f} |"
        )
    lines += _versus_baseline(models, labels, better)
    lines += ["", "![headline metrics](plots/eval_metrics.png)", "", "![POPE F1 per split](plots/eval_pope.png)", ""]
    out = paths.reports / "eval.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def _delta(delta: float, higher_is_better: bool | None) -> str:
    """'+0.012 ↑': the difference, with an arrow saying whether it is an improvement."""
    arrow = "" if higher_is_better is None or not delta else (" ↑" if (delta > 0) == higher_is_better else " ↓")
    return f"{delta:+.3f}{arrow}"


def _versus_baseline(models: dict, labels: list[str], better: dict) -> list[str]:
    """What the teacher added: each distilled student minus the same student trained without one (one run, one seed)."""
    if "baseline" not in models:
        return []
    base = headline(models["baseline"])
    lines = [
        "",
        "## Distillation vs no teacher",
        "",
        "Each student minus `baseline` (the mimic_dense student trained on the same data without a teacher);",
        "arrows say which way is better. One seed: `python bench/ablation.py` repeats it over seeds.",
        "",
        "| model | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for name in (n for n in models if n not in ("teacher", "align", "baseline")):
        figures = headline(models[name])
        cells = []
        for label in labels:
            if label not in figures or label not in base:
                cells.append("")
                continue
            cells.append(_delta(figures[label] - base[label], better[label]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _unparsed(scores: dict, split: str) -> str:
    value = scores["tasks"].get(f"tinymod_pope_{split}", {}).get("pope_unparsed")
    return "-" if value is None else f"{value:.0f}"


def write_plots(metrics: dict, paths: StagePaths) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = metrics["models"]
    names = list(models)
    paths.plots.mkdir(parents=True, exist_ok=True)
    out = []

    figures = {name: headline(models[name]) for name in names}
    labels = [label for label, *_ in HEADLINE if any(label in f for f in figures.values())]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 3.4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar([x + i * width for x in range(len(labels))], [figures[name].get(label, 0.0) for label in labels], width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(labels))], labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Headline metrics per model (CHAIR: lower is better)", fontsize=10)
    ax.legend(fontsize=7, ncol=len(names))
    fig.tight_layout()
    fig.savefig(paths.plots / "eval_metrics.png", dpi=110)
    plt.close(fig)
    out.append(paths.plots / "eval_metrics.png")

    splits = [s for s in POPE_SPLITS if any(f"tinymod_pope_{s}" in models[n]["tasks"] for n in names)]
    if splits:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for name in names:
            ax.plot(splits, [models[name]["tasks"].get(f"tinymod_pope_{s}", {}).get("pope_f1", float("nan")) for s in splits], marker="o", label=name)
        ax.set_ylabel("POPE F1")
        ax.set_title("POPE F1 per split: hallucination shows as a drop to adversarial", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(paths.plots / "eval_pope.png", dpi=110)
        plt.close(fig)
        out.append(paths.plots / "eval_pope.png")
    return out


def summary(metrics: dict) -> str:
    parts = []
    for name, scores in metrics["models"].items():
        figures = headline(scores)
        parts.append(f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if k in ("VQA acc", "POPE F1 adv", "CHAIR-i")))
    return "; ".join(parts) + f" ({metrics['seconds']:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", evaluate, __doc__, argv, summary)


if __name__ == "__main__":
    sys.exit(main())
