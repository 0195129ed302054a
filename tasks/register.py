"""Stage `register`: the final student becomes a version of a registered model in MLflow.

The version's source is the Hugging Face checkpoint (logged as run artifacts),
tagged with its lineage: recipe, git commit, DVC hashes of the curated data and
of the teacher, a hash of the resolved params and of the weights. Every new
version gets the alias ``candidate``; a gate (``register.gate``) compares the
student with the teacher and moves ``champion`` to it when every check passes,
recording why either way. A review card (``reports/review.md``) is written and
logged. Registering the same checkpoint again adds no version.

With ``register.require_approval`` the gate's verdict is recorded but
``champion`` moves only when a reviewer approves (the Prefect flow pauses for
that), through::

    python -m tasks.register promote [--params params.yaml]

Load the champion anywhere::

    path = mlflow.artifacts.download_artifacts("models:/tinymod-student@champion")
    AutoModelForImageTextToText.from_pretrained(path)

Run: ``python -m tasks.register [--params params.yaml]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from model.s3 import check_bucket
from tasks import tracking
from tasks.common import StageFailure, StagePaths, files_sha256, run_stage, write_json
from tasks.evaluate import HEADLINE, headline
from tasks.params import CHECKPOINTS, GateParams, Params



class RegisterError(StageFailure):
    """The student cannot be registered; nothing was half-registered."""


def gate_checks(student: dict, teacher: dict, gate: GateParams) -> list[dict]:
    """Each check of the promotion gate with the values it compared and whether it passed."""

    def check(name: str, value: float, bound: float, higher: bool) -> dict:
        passed = value >= bound if higher else value <= bound
        return {"check": name, "value": round(value, 4), "bound": round(bound, 4), "passed": passed}

    understanding, hallucination = gate.understanding_delta, gate.hallucination_margin
    return [
        check("VQA accuracy >= teacher - delta", student["VQA acc"], teacher["VQA acc"] - understanding, True),
        check("object recall >= teacher - delta", student["object recall"], teacher["object recall"] - understanding, True),
        check("POPE adversarial F1 >= teacher - margin", student["POPE F1 adv"], teacher["POPE F1 adv"] - hallucination, True),
        check("CHAIR-i <= teacher + margin", student["CHAIR-i"], teacher["CHAIR-i"] + hallucination, False),
        check("partner hallucination <= teacher + margin", student["partner halluc."], teacher["partner halluc."] + hallucination, False),
    ]


def register(params: Params, paths: StagePaths) -> dict:
    r = params.register
    model = params.registered_model
    checkpoint = paths.models / CHECKPOINTS[model]
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        raise RegisterError(f"register.model: {checkpoint} has no safetensors weights; run the stages before register (dvc repro)")
    scores = json.loads((paths.metrics / "eval.json").read_text())["models"]
    missing = [m for m in (model, "teacher") if m not in scores]
    if missing:
        raise RegisterError(f"metrics/eval.json has no scores for {missing}; add them to evaluate.models")
    student, teacher = headline(scores[model]), headline(scores["teacher"])
    needed = {"POPE F1 adv", "VQA acc", "CHAIR-i", "object recall", "partner halluc."}
    if not needed <= set(student) or not needed <= set(teacher):
        raise RegisterError("the gate needs tinymod_pope_adversarial, tinymod_vqa and tinymod_caption in evaluate.tasks")
    checks = gate_checks(student, teacher, r.gate)
    passed = all(c["passed"] for c in checks)
    weights_hash = files_sha256(weights)

    client, experiment_id = tracking.client(params.tracking)
    artifacts = client.get_experiment(experiment_id).artifact_location
    if artifacts.startswith("s3://"):
        check_bucket(artifacts)  # before anything is written to the registry
    name = r.model_name
    existing = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("tinymod.weights_sha256") == weights_hash]
    if existing:
        version = existing[0]
        print(f"register: {checkpoint} is already version {version.version} of {name}; no new version", flush=True)
    else:
        version = _new_version(params, paths, client, checkpoint, weights_hash, scores[model])
    client.set_registered_model_alias(name, "candidate", version.version)
    verdict = "; ".join(f"{'pass' if c['passed'] else 'FAIL'}: {c['check']} ({c['value']} vs {c['bound']})" for c in checks)
    client.set_model_version_tag(name, version.version, "tinymod.gate", "passed" if passed else "failed")
    client.set_model_version_tag(name, version.version, "tinymod.gate_checks", verdict)
    promoted = passed and r.promote and not r.require_approval
    if promoted:
        client.set_registered_model_alias(name, "champion", version.version)
        client.set_model_version_tag(name, version.version, "tinymod.champion_reason", f"gate passed: {verdict}")
    elif passed and r.promote:
        client.set_model_version_tag(name, version.version, "tinymod.awaiting_approval", "true")
    aliases = ["candidate", *(["champion"] if promoted else [])]
    review = write_review(params, paths, scores, checks, registry_state(client, name, version.version, aliases))
    # The card is what a reviewer reads in the registry: the version's description and an artifact of its run.
    client.update_model_version(name, version.version, description=review.read_text(encoding="utf-8"))
    client.log_artifact(version.run_id, str(review), artifact_path="review")
    metrics = {
        "model_name": name,
        "version": int(version.version),
        "new_version": not existing,
        "gate_passed": passed,
        "champion": promoted,
        "awaiting_approval": passed and r.promote and r.require_approval,
        "checks": checks,
    }
    write_json(paths.metrics / "register.json", metrics)
    return metrics


def promote(params: Params, paths: StagePaths, note: str = "") -> dict:
    """Move ``champion`` to the current candidate (a reviewer approved it); refuses one that failed the gate."""
    client, _ = tracking.client(params.tracking)
    name = params.register.model_name
    version = client.get_model_version_by_alias(name, "candidate")
    if version.tags.get("tinymod.gate") != "passed":
        raise RegisterError(f"{name} version {version.version} failed the gate ({version.tags.get('tinymod.gate_checks')}); it cannot become champion")
    client.set_registered_model_alias(name, "champion", version.version)
    client.set_model_version_tag(name, version.version, "tinymod.champion_reason", f"approved by a reviewer{': ' + note if note else ''}; " + version.tags.get("tinymod.gate_checks", ""))
    client.delete_model_version_tag(name, version.version, "tinymod.awaiting_approval")
    # metrics/register.json stays as the stage wrote it (a DVC output); the registry holds the approval.
    return {"model_name": name, "version": int(version.version), "new_version": False, "champion": True, "awaiting_approval": False}


def _new_version(params: Params, paths: StagePaths, client, checkpoint: Path, weights_hash: str, student_scores: dict):
    """Log the checkpoint and review as a run's artifacts, then the version; on failure nothing half-registered stays."""
    from mlflow.entities import RunTag

    run_id = tracking.start_stage_run(params, "register", params.register.model_dump(mode="json"))
    try:
        client.log_artifacts(run_id, str(checkpoint), artifact_path="model")
        for path in (paths.metrics / "eval.json", paths.reports / "data_card.md", *sorted(paths.plots.glob("eval_*.png"))):
            if path.exists():
                client.log_artifact(run_id, str(path), artifact_path="review")
        tags = lineage_tags(params, paths, weights_hash)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        # The registered model appears only once its first version's artifacts are stored.
        if not client.search_registered_models(filter_string=f"name='{params.register.model_name}'"):
            client.create_registered_model(
                params.register.model_name, description="tinymod students distilled from a LLaVA teacher (see each version's review card)."
            )
        version = client.create_model_version(params.register.model_name, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags)
    except Exception:
        tracking.finish_run(params.tracking, run_id, {}, [], failed=True)
        raise
    tracking.finish_run(params.tracking, run_id, {"student": student_scores["tasks"]}, [])
    return version


def lineage_tags(params: Params, paths: StagePaths, weights_hash: str) -> dict[str, str]:
    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").exists() else {}
    stages = lock.get("stages", {})

    def out_hash(stage: str, path: Path) -> str:
        for out in stages.get(stage, {}).get("outs", []):
            if Path(out["path"]) == path:
                return out.get("md5", "")
        return "unknown (not run through dvc repro)"

    return {
        "tinymod.recipe": params.recipe,
        "tinymod.model": params.registered_model,
        "tinymod.git_commit": tracking.git_commit(),
        "tinymod.dvc.curated_md5": out_hash("curate", paths.curated),
        "tinymod.dvc.teacher_md5": out_hash("teacher", paths.teacher),
        "tinymod.params_hash": tracking.params_hash(params.model_dump(mode="json")),
        "tinymod.weights_sha256": weights_hash,
    }


def registry_state(client, name: str, version: str, aliases: list[str]) -> dict:
    """This version, the aliases it got, and where ``champion`` points now (None: no champion yet)."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, "champion").version
    except MlflowException:
        champion = None
    return {"name": name, "version": version, "aliases": aliases, "champion": champion}


def write_review(params: Params, paths: StagePaths, scores: dict, checks: list[dict], registry: dict) -> Path:
    """The review card: the registry's verdict, teacher vs student with deltas, the gate, parameters, training time, data."""
    r = params.register
    student, teacher = scores[params.registered_model], scores["teacher"]
    s, t = headline(student), headline(teacher)
    failed = [c for c in checks if not c["passed"]]
    champion = f"version {registry['champion']}" if registry["champion"] else "no version yet"
    lines = [
        f"# Review: {r.model_name} ({params.registered_model} student, recipe {params.recipe})",
        "",
        f"Version {registry['version']}, aliases: {', '.join('@' + a for a in registry['aliases'])}. `champion` points to {champion}.",
        (
            f"The gate failed {len(failed)} of {len(checks)} checks ({', '.join(c['check'] for c in failed)}): this version stays "
            "`@candidate`, and `python -m tasks.register promote` refuses it. Improve the student, or change `register.gate` "
            "if its bounds are wrong, then `dvc repro register`."
            if failed
            else "The gate passed."
            + ("" if "champion" in registry["aliases"] else " After review: `python -m tasks.register promote --note \"...\"`.")
        ),
        "",
        "| metric | teacher | student | delta |",
        "|---|---:|---:|---:|",
    ]
    for label, *_ in HEADLINE:
        if label in s and label in t:
            lines.append(f"| {label} | {t[label]:.3f} | {s[label]:.3f} | {s[label] - t[label]:+.3f} |")
    sp, tp = student["parameters"], teacher["parameters"]
    lines += [
        f"| parameters (active / total) | {tp['active']:,} / {tp['total']:,} | {sp['active']:,} / {sp['total']:,} | {sp['active'] / tp['active']:.0%} active |",
        f"| decode tokens/s | {teacher['decode_tokens_per_second']:.0f} | {student['decode_tokens_per_second']:.0f} | |",
        "",
        "## Gate",
        "",
        "| check | value | bound | |",
        "|---|---:|---:|---|",
        *[f"| {c['check']} | {c['value']} | {c['bound']} | {'pass' if c['passed'] else 'FAIL'} |" for c in checks],
        "",
        "## Training",
        "",
        "| stage | steps | seconds | trained / total parameters | final loss |",
        "|---|---:|---:|---:|---:|",
    ]
    total = 0.0
    for stage in ("teacher", *(name for name, _ in params.training_sections())):
        path = paths.metrics / f"{stage}.json"
        if path.exists():
            m = json.loads(path.read_text())
            if "steps" not in m:  # an imported teacher: trained elsewhere
                lines.append(f"| {stage} | imported from {m.get('source', '?')} | | {m.get('total_parameters', 0):,} | |")
                continue
            total += m.get("seconds", 0.0)
            lines.append(f"| {stage} | {m['steps']} | {m['seconds']:.0f} | {m['trainable']:,} / {m['total']:,} | {m.get('final', {}).get('loss', float('nan')):.4f} |")
    lines += [f"| all | | {total:.0f} | | |", "", "## Data", ""]
    card = paths.reports / "data_card.md"
    if card.exists():
        # The data card's summary and per-split table: everything before its first section.
        body = card.read_text(encoding="utf-8").splitlines()[1:]
        end = next((i for i, line in enumerate(body) if line.startswith("## ")), len(body))
        lines += [line for line in body[:end] if line.strip()]
    lines += ["", "![headline metrics](plots/eval_metrics.png)", "", "![POPE per split](plots/eval_pope.png)", ""]
    out = paths.reports / "review.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def summary(metrics: dict) -> str:
    new = "new version" if metrics["new_version"] else "existing version"
    head = f"{metrics['model_name']} {new} {metrics['version']}"
    if metrics.get("champion"):
        return f"{head} is @champion (gate passed)"
    if metrics.get("awaiting_approval"):
        return f"{head} passed the gate and is @candidate awaiting approval: review reports/review.md, then python -m tasks.register promote --note \"...\""
    failed = [c for c in metrics["checks"] if not c["passed"]]
    if not failed:
        return f"{head} passed the gate and is @candidate (register.promote is off)"
    reasons = "; ".join(f"{c['check']}: {c['value']} vs {c['bound']}" for c in failed)
    return (
        f"{head} is @candidate: the gate FAILED {len(failed)} of {len(metrics['checks'])} checks ({reasons}). "
        "promote refuses it; see reports/review.md (also the version's description in the MLflow registry)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["promote"]:
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--note", default="")
        known, rest = parser.parse_known_args(argv[1:])
        return run_stage(
            "register", lambda p, paths: promote(p, paths, known.note), "promote [--params FILE] [--note TEXT]: move champion to the candidate after review.", rest, summary,
            headline_out=False,  # the registry holds the approval; the stage's DVC outputs stay as it wrote them
        )  # fmt: skip
    if argv[:1] and not argv[0].startswith("-"):
        argparse.ArgumentParser(prog="python -m tasks.register").error(f"unknown command {argv[0]!r}; the only command is promote")
    return run_stage("register", register, __doc__, argv, summary)


if __name__ == "__main__":
    sys.exit(main())
