"""The DVC stage graph of a recipe: ``dvc.yaml`` is rendered from the params, never edited by hand.

DVC cannot make a stage conditional on a parameter, and the two recipes run
different stages (LLaVA-MoD upcycles and runs preference; LLaVA-KD's student
stays dense and ends with DFT), so ``dvc.yaml`` is written from the resolved
params: the stages of ``Params.pipeline``, each with the code it imports
(found by reading the imports, so a new module is never a forgotten dep), the
checkpoints it reads and writes, and the params sections it resolves. Every
stage refuses to start when ``dvc.yaml`` is not what the params render, and
says to run this::

    python -m tasks.stages            # write dvc.yaml for params.yaml (after changing recipe, stages, evaluate.models)
    python -m tasks.stages --check    # exit 1 when dvc.yaml is out of date
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import yaml

from tasks.params import CHECKPOINTS, REPO, STUDENT_STAGES, Params, ParamsError, load_params

HEADER = """\
# Rendered from params.yaml and its recipe by `python -m tasks.stages`: do not edit by hand.
# Each stage's cmd is its tasks/ module; the Prefect flow runs these same stages. Paths come from
# params.yaml (`paths`), so outputs land where DESIGN.md says. Every stage lists the code it
# imports, the checkpoints it reads and only the params sections it resolves.
"""
SHARED_PARAMS = ["seed", "preset", "recipe", "paths"]  # every student stage resolves its values through these
TRAINING_DEPS = ["infra/deepspeed", "recipes", "presets"]


def _uncached(path: str) -> dict:
    return {path: {"cache": False}}


def code_deps(stage: str, root: Path = REPO) -> list[str]:
    """The repo's modules ``tasks/<stage>.py`` imports, directly or not, in the order first met.

    Imports inside functions count (stages import torch-heavy code lazily), and so does a module
    named as a string, as ``model.engine`` is by the job launcher.
    """
    seen: list[str] = []
    queue = [f"tasks.{stage}"]
    while queue:
        module = queue.pop(0)
        path = root / (module.replace(".", "/") + ".py")
        if module in seen or not path.is_file():
            continue
        seen.append(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                queue += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                queue += [alias.name for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(("model.", "tasks.")):
                queue.append(node.value)
    return [m.replace(".", "/") + ".py" for m in seen if m.split(".")[0] in ("model", "tasks")]


def _training(name: str, reads: list[str], makes: str, extra_params: list[str] | None = None) -> dict:
    return {
        "deps": TRAINING_DEPS + reads,
        "params": SHARED_PARAMS + [name] + (extra_params or []),
        "outs": [_uncached(f"${{paths.metrics}}/{name}.json"), makes],
        "plots": [
            _uncached(f"${{paths.reports}}/plots/{name}_loss.png"),
            {f"${{paths.metrics}}/history/{name}.json": {"x": "step", "y": "loss", "title": f"{name} training loss", "cache": False}},
        ],
    }


def stage_specs(params: Params) -> dict[str, dict]:
    """What every stage of ``params.pipeline`` reads, resolves and writes (its code deps come later)."""
    data, models, metrics, reports = "${paths.data}", "${paths.models}", "${paths.metrics}", "${paths.reports}"
    teacher, curated, cache = f"{models}/teacher", f"{data}/curated", f"{data}/teacher_cache"

    def student(key: str) -> str:
        return f"{models}/student_{key}"

    specs = {
        "curate": {
            "deps": ["presets", "teachers"],
            "params": ["preset", "paths", "curate"],
            "outs": [
                _uncached(f"{metrics}/curate.json"), f"{data}/world", curated, f"{models}/tokenizer",
                _uncached(f"{reports}/data_card.md"), _uncached(f"{reports}/plots/world_samples.png"),
            ],
        },
        "teacher": {
            "deps": ["infra/deepspeed", "presets", "teachers", curated, f"{models}/tokenizer"],
            "params": ["preset", "paths", "teacher", "curate.world", "curate.sources"],
            "outs": [_uncached(f"{metrics}/teacher.json"), teacher],
            "plots": [
                _uncached(f"{reports}/plots/teacher_loss.png"),
                {f"{metrics}/history/teacher.json": {"x": "step", "y": "loss", "title": "teacher training loss", "cache": False}},
            ],
        },
        "teacher_cache": {
            "deps": ["recipes", "presets", curated, teacher],
            # Which records and positions are cached follows from the training stages' sections (preference is always live).
            "params": SHARED_PARAMS + ["teacher_cache"] + [name for name, _ in params.training_sections() if not STUDENT_STAGES[name].pairs],
            "outs": [_uncached(f"{metrics}/teacher_cache.json"), cache],
        },
    }
    for name in params.stages:
        stage = STUDENT_STAGES[name]
        reads = [curated, teacher] if stage.reads is None else [curated, teacher, student(stage.reads)]
        if name == "align":
            llm = params.align.student.llm
            shipped_llm = [llm] if llm != "init" and not Path(llm).is_absolute() else []  # the repo's own (students/embedded) is versioned with it
            specs[name] = _training(name, [curated, f"{data}/world", teacher, cache, *shipped_llm], student("align"), ["curate.world", "curate.sources"])
        elif name == "upcycle":
            specs[name] = {
                "deps": [curated, student("dense")],
                "params": ["seed", "preset", "paths", "upcycle"],
                "outs": [_uncached(f"{metrics}/upcycle.json"), student("upcycled")],
            }
        elif name == "preference":
            specs[name] = _training(name, reads, student("pref"), ["evaluate.limit", "curate.world.shapes"])
        else:
            specs[name] = _training(name, [*reads, cache], student(stage.makes))
        if name == "mimic_dense":
            # The no-teacher control: mimic_dense's settings, ce only, from the aligned student.
            specs["baseline"] = _training("baseline", [curated, student("align")], student("baseline"))
            specs["baseline"]["params"] = SHARED_PARAMS + ["mimic_dense"]
    specs["evaluate"] = {
        "deps": ["model/lmms_tasks", f"{curated}/probes", *(f"{models}/{CHECKPOINTS[m]}" for m in params.evaluated_models)],
        "params": ["recipe", "paths", "evaluate"],
        "outs": [_uncached(f"{metrics}/eval.json"), _uncached(f"{reports}/eval.md")],
        "plots": [_uncached(f"{reports}/plots/eval_metrics.png"), _uncached(f"{reports}/plots/eval_pope.png")],
    }
    specs["register"] = {
        "deps": [f"{metrics}/eval.json", f"{models}/{CHECKPOINTS[params.registered_model]}"],
        "params": ["recipe", "paths", "register"],
        "outs": [_uncached(f"{metrics}/register.json"), _uncached(f"{reports}/review.md")],
    }
    return {name: specs[name] for name in params.pipeline}


def render(params: Params, root: Path = REPO) -> dict:
    """``dvc.yaml``'s content for ``params``."""
    stages = {}
    for name, spec in stage_specs(params).items():
        entry = {"cmd": f"python -m tasks.{name}", "deps": code_deps(name, root) + spec["deps"], "params": spec["params"]}
        entry["outs"] = spec["outs"]
        entry["metrics"] = [_uncached(f"${{paths.metrics}}/headline/{name}.json")]
        if "plots" in spec:
            entry["plots"] = spec["plots"]
        stages[name] = entry
    return {"stages": stages}


def dump(content: dict) -> str:
    return HEADER + yaml.safe_dump(content, sort_keys=False, width=200)


def out_of_date(params: Params, root: Path) -> str | None:
    """Why ``root/dvc.yaml`` is not what ``params`` render, or None when it is."""
    path = root / "dvc.yaml"
    if not path.is_file():
        return None  # a stage run by hand outside a DVC project
    current = yaml.safe_load(path.read_text()) or {}
    wanted = render(params, root)
    if current == wanted:
        return None
    have, want = list(current.get("stages", {})), list(wanted["stages"])
    if have != want:
        why = f"it runs {', '.join(have)} but recipe {params.recipe} runs {', '.join(want)}"
    else:
        changed = [name for name in want if current["stages"][name] != wanted["stages"][name]]
        why = f"the stages {', '.join(changed)} read or write other files than the params say"
    return f"dvc.yaml is out of date with the params ({why}); run `python -m tasks.stages` to render it, then `dvc repro`"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml is not what the params render")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as error:
        print(error, file=sys.stderr)
        return 1
    root = args.params.resolve().parent
    if args.check:
        why = out_of_date(params, root)
        print(why or "dvc.yaml: up to date", file=sys.stderr if why else sys.stdout)
        return 1 if why else 0
    (root / "dvc.yaml").write_text(dump(render(params, root)))
    print(f"dvc.yaml: {len(params.pipeline)} stages for recipe {params.recipe}: {', '.join(params.pipeline)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
