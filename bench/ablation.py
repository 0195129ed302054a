"""Reproduce the papers' claims in miniature on the embedded world, over seeds.

Each variant and seed runs in a fresh workspace (a copy of the pipeline) that
shares this checkout's DVC cache, so `curate` and `teacher` come from DVC's
run-cache (the teacher has its own seed) and only the student stages train:

    no_teacher         align + mimic_dense with ce only                  -> dense student
                       (this is also LLaVA-KD's baseline, PT -> SFT: plain ce alignment of the
                       projector, then SFT; the same run under either recipe's name)
    llava_mod          align + mimic_dense (KD) -> upcycle + mimic_sparse (KD) -> preference
                       scored after mimic_dense (dense KD), mimic_sparse (MoE KD), preference
    dense_kd           llava_mod stopped after mimic_dense: the dense KD student alone, claim (a) in half the time
    dense_same_active  the same stages with a dense student as wide as the MoE's active FFN
                       (upcycled to 1 expert, top-1: a dense FFN in MoE form), its LLM
                       students/embedded-wide, students/embedded widened with the same function
                       (with --set align.student.llm=init --set align.student.sha256=null both
                       arms start fresh)
    llava_mod_live     llava_mod's mimic stages with the teacher live instead of cached (the cache's quality check)
    llava_mod_kl_only, dense_same_active_kl_only   llava_mod and its dense control with the mimic stages'
                       KL alone, LLaVA-MoD's released objective (the recipe adds ce on the annotations)
    llava_kd           the LLaVA-KD recipe (DPT -> SFT -> DFT), student kept dense -> student after DFT
    llava_kd_dpt_sft, llava_kd_pt_sft_dft   LLaVA-KD's schedule ablation (with no_teacher = PT -> SFT
                       and llava_kd): the recipe ending at SFT, and with PT (ce-only align) for DPT
    llava_kd_dft_response   llava_kd with DFT's image KL and RDist off (ce and the response KL only)
    llava_kd_dft_ce    llava_kd with DFT's ce alone: as many steps, no teacher in them

Every student is scored through the evaluate stage (lmms-eval). Writes
reports/ablation.md, reports/plots/ablation.png and metrics/ablation.json, and
logs them to MLflow (experiment tinymod-ablation).

    python bench/ablation.py [--seeds 0 1 2] [--variants ...] [--workdir DIR] [--jobs 2] [--set KEY=VALUE ...]

With --workdir, finished runs are kept there and a rerun skips them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.evaluate import HEADLINE, headline
from tasks.params import REPO, deep_merge
from workspace import dotted_overrides, dvc_env, make_workspace

# The mimic stages on the KL alone: LLaVA-MoD's released objective (the recipe adds ce on the annotations).
KL_ONLY = {"mimic_dense": {"loss": {"ce": 0.0}}, "mimic_sparse": {"loss": {"ce": 0.0}}}
# Claim (b)'s control: FFN 576, the MoE's mean active width (top-2 of 384 in layer 0, 384 in layer 1).
# A pretrained student LLM fixes its own width, so the control starts from students/embedded-wide:
# students/embedded widened to 576 with the same function (`bench/student_llm.py students/embedded-wide
# --widen students/embedded --intermediate-size 576`), as the MoE's experts start as its FFN's copies.
WIDE_LLM = {"llm": "students/embedded-wide", "sha256": "e9cbc53ec195bc05458d8b7cccfb4cfb193139f420dbf5fd94e33191fdd74312"}
DENSE_SAME_ACTIVE = {"align": {"student": {**WIDE_LLM, "text": {"intermediate_size": 576}}}, "upcycle": {"num_experts": 1, "top_k": 1}}

# variant -> (params overrides, last DVC stage, {model key: row label})
VARIANTS = {
    "no_teacher": (
        {"align": {"loss": {"ce": 1.0}}, "mimic_dense": {"loss": {"ce": 1.0, "kl_response": 0.0}}},
        "mimic_dense",
        {"dense": "(1) no teacher, ce only (dense) = LLaVA-KD's PT -> SFT"},
    ),
    "llava_mod": (
        {},
        "preference",
        {"dense": "(2) mimic_dense: dense KD", "moe": "(3) + upcycle + mimic_sparse: MoE KD", "pref": "(4) + preference distillation"},
    ),
    # llava_mod's first two stages only: claim (a) in half the time.
    "dense_kd": ({}, "mimic_dense", {"dense": "(2) mimic_dense: dense KD"}),
    "dense_same_active": (
        DENSE_SAME_ACTIVE,
        "mimic_sparse",
        {"moe": "(5) dense, same active parameters as (3)"},
    ),
    # The same as llava_mod's first stages with the teacher run live in every step instead of read from the cache.
    "llava_mod_live": (
        {"mimic_dense": {"teacher": {"mode": "live"}}, "mimic_sparse": {"teacher": {"mode": "live"}}},
        "mimic_sparse",
        {"dense": "(2') dense KD, live teacher", "moe": "(3') MoE KD, live teacher"},
    ),
    "llava_mod_kl_only": (
        KL_ONLY,
        "preference",
        {"dense": "(2k) dense KD, the KL alone", "moe": "(3k) MoE KD, the KL alone", "pref": "(4k) + preference, after the KL alone"},
    ),
    "dense_same_active_kl_only": (
        deep_merge(DENSE_SAME_ACTIVE, KL_ONLY),
        "mimic_sparse",
        {"moe": "(5k) dense, same active parameters as (3k), the KL alone"},
    ),
    # LLaVA-KD's own stage graph: the student stays dense, DFT's is the final one.
    "llava_kd": ({"recipe": "llava-kd"}, "dft", {"dft": "(6) LLaVA-KD: DPT -> SFT -> DFT (dense)"}),
    # LLaVA-KD's ablation of its schedule (its Table 4), beside (1) = PT -> SFT and (6): not in the default run.
    "llava_kd_dpt_sft": ({"recipe": "llava-kd", "stages": ["align", "mimic_dense"]}, "mimic_dense", {"dense": "(7) LLaVA-KD: DPT -> SFT"}),
    "llava_kd_pt_sft_dft": (
        {"recipe": "llava-kd", "align": {"loss": {"ce": 1.0, "kl_response": 0.0, "kl_visual": 0.0, "relation": 0.0}}},
        "dft",
        {"dft": "(8) LLaVA-KD: PT -> SFT -> DFT"},
    ),
    # Which of DFT's terms brings its extra "yes" to absent objects: DFT with the response KL alone.
    "llava_kd_dft_response": (
        {"recipe": "llava-kd", "dft": {"loss": {"ce": 1.0, "kl_response": 1.0, "kl_visual": 0.0, "relation": 0.0}}},
        "dft",
        {"dft": "(9) LLaVA-KD: DPT -> SFT -> DFT with the response KL alone"},
    ),
    # ... and whether it is the teacher at all, or 375 more steps on the same records: DFT with ce alone.
    "llava_kd_dft_ce": (
        {"recipe": "llava-kd", "dft": {"loss": {"ce": 1.0, "kl_response": 0.0, "kl_visual": 0.0, "relation": 0.0}}},
        "dft",
        {"dft": "(10) LLaVA-KD: DPT -> SFT -> DFT with ce alone (no teacher after DPT)"},
    ),
}
SEEDS = [0, 1, 2]
DEFAULT_VARIANTS = ["no_teacher", "llava_mod", "dense_same_active", "llava_mod_live", "llava_kd"]
# Higher is better (True), lower (False) or neither (None), per headline figure.
HIGHER = {label: up for label, _, _, up in HEADLINE}
STAGE_METRICS = ("align", "mimic_dense", "mimic_sparse", "preference", "dft")
# A model's training time is that of the stages that lead to it.
TRAINED_BY = {"dense": ("align", "mimic_dense"), "moe": ("align", "mimic_dense", "mimic_sparse"), "pref": STAGE_METRICS[:4], "dft": ("align", "mimic_dense", "dft")}


def run(command: list[str], cwd: Path, threads: int | None) -> None:
    env = dvc_env() | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    process = subprocess.run(command, cwd=cwd, env=env, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}:\n{process.stdout[-4000:]}")


def run_variant(name: str, seed: int, workdir: Path, with_teacher: bool, threads: int | None, changes: dict) -> dict:
    """The variant's scores, training time and when it ran; ``changes`` (``--set``) go on top of the variant's overrides."""
    overrides, last_stage, models = VARIANTS[name]
    overrides = deep_merge(overrides, changes)
    evaluate = list(models) + (["teacher"] if with_teacher else [])
    done = workdir / f"{name}-seed{seed}.json"
    if done.exists() and json.loads(done.read_text()).get("overrides") == overrides:  # a rerun with the same --workdir and --set resumes
        return json.loads(done.read_text())
    started = time.time()
    shutil.rmtree(workdir / f"{name}-seed{seed}", ignore_errors=True)  # finished stages come back from DVC's run-cache
    root = make_workspace(workdir / f"{name}-seed{seed}", {**overrides, "seed": seed, "evaluate": {"models": evaluate}})
    run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(REPO / ".dvc" / "cache")], root, threads)
    run([sys.executable, "-m", "dvc", "repro", last_stage], root, threads)
    run([sys.executable, "-m", "tasks.evaluate"], root, threads)  # only the variant's students: outside DVC, in a throwaway workspace
    scores = json.loads((root / "metrics/eval.json").read_text())["models"]
    seconds = {s: json.loads((root / f"metrics/{s}.json").read_text())["seconds"] for s in STAGE_METRICS if (root / f"metrics/{s}.json").exists()}
    print(f"ablation: {name} seed {seed} done in {time.time() - started:.0f} s", flush=True)
    result = {"scores": scores, "stage_seconds": seconds, "started": started, "finished": time.time(), "overrides": overrides}
    done.write_text(json.dumps(result))
    return result


def reproduce_command(args: argparse.Namespace) -> str:
    """The command line that reruns this report: every option that is not the default, quoted for a shell."""
    return (
        "python bench/ablation.py"
        + ("" if args.seeds == SEEDS else f" --seeds {' '.join(map(str, args.seeds))}")
        + ("" if args.variants == DEFAULT_VARIANTS else f" --variants {' '.join(args.variants)}")
        + ("" if args.name == "ablation" else f" --name {args.name}")
        + "".join(f" --set {shlex.quote(change)}" for change in args.changes)
    )


def busy_seconds(runs: list[dict]) -> float:
    """Wall time during which at least one run was going: parallel runs count once, pauses between resumed invocations not at all."""
    total, reached = 0.0, float("-inf")
    for run_ in sorted(runs, key=lambda r: r["started"]):
        total += max(0.0, run_["finished"] - max(run_["started"], reached))
        reached = max(reached, run_["finished"])
    return total


def table(results: dict) -> tuple[list[str], dict]:
    """Markdown rows (mean ± std over seeds) and the same numbers as data."""
    rows, data = [], {}
    labels = [("teacher", "teacher", "teacher")] + [(v, m, label) for v, (_, _, models) in VARIANTS.items() for m, label in models.items()]
    for variant, model, label in labels:
        runs = results.get("teacher" if variant == "teacher" else variant, [])
        per_seed = [r["scores"][model] for r in runs if model in r["scores"]]
        if not per_seed:
            continue
        entry = {}
        cells = []
        for column in HIGHER:
            values = [figures[column] for figures in map(headline, per_seed) if column in figures]
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[column] = {"mean": mean, "std": std, "n": len(values), "per_seed": values}
            cells.append(f"{mean:.3f} ± {std:.3f}")
        params = per_seed[0]["parameters"]
        stages = TRAINED_BY[model] if variant != "teacher" else ()
        seconds = [sum(r["stage_seconds"].get(s, 0.0) for s in stages) for r in runs] if stages else []
        entry.update(parameters=params, train_seconds=statistics.fmean(seconds) if seconds else None)
        time_cell = f"{statistics.fmean(seconds):.0f}" if seconds else "(teacher stage)"
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {params['active']:,} / {params['total']:,} | {time_cell} |")
        data[label] = entry
    return rows, data


# claim -> (row it is about, row it is compared with, columns that show it)
CLAIMS = [
    ("(a) distillation beats training without a teacher", "(2)", "(1)", ["VQA acc", "POPE acc adv", "POPE F1 adv", "CHAIR-i"]),
    ("(b) the MoE student beats the dense one at equal active parameters", "(3)", "(5)", ["VQA acc", "POPE acc adv", "POPE F1 adv", "CHAIR-i"]),
    ("(c) after preference distillation the student hallucinates less than the teacher", "(4)", "teacher", ["partner halluc.", "POPE F1 adv", "POPE acc adv", "CHAIR-i"]),
    ("(c) ... at no loss of understanding or recall (vs the student before it)", "(4)", "(3)", ["VQA acc", "object recall", "partner halluc.", "POPE F1 adv"]),
    ("(a) with the KL alone (LLaVA-MoD's released script)", "(2k)", "(1)", ["VQA acc", "POPE acc adv", "POPE F1 adv", "CHAIR-i"]),
    ("(b) with the KL alone", "(3k)", "(5k)", ["VQA acc", "POPE acc adv", "POPE F1 adv", "CHAIR-i"]),
    ("(c) with the KL alone", "(4k)", "teacher", ["partner halluc.", "POPE F1 adv", "POPE acc adv", "CHAIR-i"]),
    ("(c) ... at no loss (vs the student before it), with the KL alone", "(4k)", "(3k)", ["VQA acc", "object recall", "partner halluc.", "POPE F1 adv"]),
    ("(d) LLaVA-KD: DPT -> SFT -> DFT beats PT -> SFT", "(6)", "(1)", ["VQA acc", "POPE acc adv", "POPE F1 adv", "CHAIR-i"]),
    ("(d') LLaVA-KD's schedule: DPT -> SFT beats PT -> SFT", "(7)", "(1)", ["VQA acc", "POPE F1 adv", "CHAIR-i"]),
    ("(d') ... and PT -> SFT -> DFT beats PT -> SFT", "(8)", "(1)", ["VQA acc", "POPE F1 adv", "CHAIR-i"]),
    ("(d') ... and DPT -> SFT -> DFT with the response KL alone beats PT -> SFT", "(9)", "(1)", ["VQA acc", "POPE acc adv", "POPE F1 adv", "CHAIR-i"]),
    ("(d') the teacher in DFT: DPT -> SFT -> DFT against DFT's steps with ce alone", "(6)", "(10)", ["VQA acc", "POPE acc adv", "POPE F1 adv", "CHAIR-i"]),
    ("(cache) the teacher cache's top-32 distils the MoE student as the live teacher does", "(3)", "(3')", ["VQA acc", "POPE F1 adv", "object recall", "partner halluc."]),
]


def claims(data: dict) -> list[str]:
    """One line per claim and metric: the difference, and whether it is larger than the seeds' spread."""
    rows = {label.split(" ")[0]: entry for label, entry in data.items()}
    lines = []
    for claim, subject, baseline, columns in CLAIMS:
        if subject not in rows or baseline not in rows:
            continue
        lines.append(f"- **{claim}** ({subject} vs {baseline}):")
        for column in columns:
            ours, theirs = rows[subject][column], rows[baseline][column]
            better = (ours["mean"] - theirs["mean"]) * (1 if HIGHER[column] else -1)
            spread = (ours["std"] ** 2 + theirs["std"] ** 2) ** 0.5
            if len(ours["per_seed"]) < 2:
                # No spread to weigh the difference against: a pilot's figure, not a verdict.
                verdict = f"{better:+.3f} in its favour, one seed (no spread to judge by)"
            elif claim.startswith("(cache)"):
                # Here "holds" means the two are the same within noise.
                verdict = "the same within the seeds' spread" if abs(better) <= spread else f"{'better' if better > 0 else 'worse'} beyond the seeds' spread"
            elif claim.startswith("(c) ...") and column in ("VQA acc", "object recall"):
                # "no loss": the claim holds unless it is worse beyond the spread.
                verdict = "no loss" if better > -spread else "a loss beyond the seeds' spread"
            else:
                verdict = "holds" if better > spread else "does not hold" if better < -spread else "within the seeds' spread"
            lines.append(f"  - {column} {ours['mean']:.3f} vs {theirs['mean']:.3f}: {verdict}{paired(ours, theirs, column)}")
        if any(column.startswith("CHAIR") for column in columns):
            # CHAIR counts hallucinated objects among those mentioned: captions that name nothing score perfectly.
            recall = rows[subject]["object recall"]["mean"], rows[baseline]["object recall"]["mean"]
            lines.append(f"  - (object recall {recall[0]:.3f} vs {recall[1]:.3f}: CHAIR only means something where both name the objects)")
    return lines


def paired(ours: dict, theirs: dict, column: str) -> str:
    """Seed by seed (same seed, same data order): where seeds move every model together, this sees through it."""
    if len(ours["per_seed"]) < 2 or len(theirs["per_seed"]) not in (1, len(ours["per_seed"])):
        return ""
    baseline = theirs["per_seed"] * len(ours["per_seed"]) if len(theirs["per_seed"]) == 1 else theirs["per_seed"]
    sign = 1 if HIGHER[column] else -1
    gains = [sign * (a - b) for a, b in zip(ours["per_seed"], baseline, strict=True)]
    wins = sum(g > 0 for g in gains)
    return f" (better in {wins} of {len(gains)} seeds, by {statistics.fmean(gains):+.3f} ± {statistics.stdev(gains):.3f})"


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["VQA acc", "POPE acc adv", "POPE F1 adv", "partner halluc."]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.8), sharey=False)
    for ax, column in zip(axes, shown, strict=True):
        labels = list(data)
        means = [data[label][column]["mean"] for label in labels]
        stds = [data[label][column]["std"] for label in labels]
        ax.barh(range(len(labels)), means, xerr=stds, color=["grey"] + ["C0"] * (len(labels) - 1))
        ax.set_yticks(range(len(labels)), [label.split(")")[0] + ")" if ")" in label else label for label in labels], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(column + (" (lower is better)" if HIGHER[column] is False else ""), fontsize=9)
    fig.suptitle("Ablation on the embedded world (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS), help="default: the four claims and the cache check; "
                        "LLaVA-KD's schedule ablation: no_teacher llava_kd llava_kd_dpt_sft llava_kd_pt_sft_dft")
    parser.add_argument("--name", default="ablation", help="reports/<name>.md, reports/plots/<name>.png, metrics/<name>.json (default: ablation)")
    parser.add_argument("--workdir", type=Path, help="keep the workspaces here (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, each with cores/jobs threads (default 2)")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                        help="a params change for every variant, dotted key and YAML value (mimic_dense.lr=0.003); repeatable")
    args = parser.parse_args()
    changes = dotted_overrides(args.changes)
    runs = [(name, seed) for seed in args.seeds for name in args.variants]
    # Small models leave cores idle in imports, launches and decoding; two runs at once fill them.
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        workdir = args.workdir or Path(tmp)
        outcomes = pool.map(lambda run_: run_variant(*run_, workdir, with_teacher=run_ == runs[0], threads=threads, changes=changes), runs)
        for (name, _), result in zip(runs, outcomes, strict=True):
            results.setdefault(name, []).append(result)
            if "teacher" in result["scores"]:
                results["teacher"] = [result]
    rows, data = table(results)
    minutes = busy_seconds([r for name in args.variants for r in results[name]]) / 60
    header = ["| model | " + " | ".join(HIGHER) + " | active / total params | train s |", "|---|" + "---:|" * (len(HIGHER) + 2)]
    report = [
        "# Ablation on the embedded world",
        "",
        f"Seeds {args.seeds}; every student scored by the evaluate stage (lmms-eval); {minutes:.0f} minutes in all.",
        f"Reproduce: `{reproduce_command(args)}`.",
        "",
        *header,
        *rows,
        "",
        "## The papers' claims",
        "",
        *claims(data),
        "",
        "Why a claim does not clear the spread is measured, not guessed: README, Results, "
        "\"What holds on this default, and why the rest does not\", and the runs it cites.",
        "",
        f"![ablation](plots/{args.name}.png)",
        "",
    ]
    (REPO / "reports/plots").mkdir(parents=True, exist_ok=True)
    outputs = [REPO / f"reports/{args.name}.md", REPO / f"reports/plots/{args.name}.png", REPO / f"metrics/{args.name}.json"]
    outputs[0].write_text("\n".join(report), encoding="utf-8")
    plot(data, outputs[1])
    outputs[2].write_text(json.dumps({"seeds": args.seeds, "variants": args.variants, "minutes": minutes, "rows": data}, indent=2))
    log_to_mlflow(data, args.seeds, args.variants, outputs)
    print("\n".join(report))


def log_to_mlflow(data: dict, seeds: list[int], variants: list[str], outputs: list[Path]) -> None:
    from tasks import tracking
    from tasks.params import load_params

    params = load_params(REPO / "params.yaml")
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"experiment": "tinymod-ablation"})})
    run_id = tracking.start_stage_run(params, "ablation", {"seeds": seeds, "variants": variants}, root=REPO)
    # MLflow names allow no apostrophe: row (2') is logged as 2-live.
    metrics = {
        (label.split(")")[0].strip("(").replace("'", "-live") if ")" in label else label): {c: v["mean"] for c, v in e.items() if isinstance(v, dict) and "mean" in v}
        for label, e in data.items()
    }
    tracking.finish_run(params.tracking, run_id, metrics, outputs, root=REPO)


if __name__ == "__main__":
    main()
