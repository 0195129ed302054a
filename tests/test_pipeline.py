"""The whole pipeline on the CI preset through the Prefect flow: registry, review card, DVC versioning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.workspace import dvc_env

from .conftest import make_project


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / '.mlflow/mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True, env=dvc_env())


def test_dvc_repro_again_does_nothing_and_a_param_reruns_only_downstream(project):
    """First in this file: later tests run stages outside DVC on purpose."""
    out = dvc(project, "repro")
    assert out.returncode == 0, out.stderr
    assert "Running stage" not in out.stdout
    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["evaluate"]["max_new_tokens"] = 40
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        out = dvc(project, "repro")
    finally:
        (project / "params.yaml").write_text(original)
    assert out.returncode == 0, out.stderr
    ran = {line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate", "register"}, out.stdout


def test_dvc_metrics_show_is_a_short_headline_per_stage(project):
    out = dvc(project, "metrics", "show")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(map(len, lines)) <= 160, f"{max(map(len, lines))} characters wide:\n{out.stdout}"
    for stage in ("curate", "teacher", "mimic_dense", "evaluate", "register"):
        assert f"metrics/headline/{stage}.json" in out.stdout
    assert {"vqa", "pope_f1_adv", "loss", "seconds", "gate_passed"} <= set(lines[0].split())
    rich = json.loads((project / "metrics/mimic_sparse.json").read_text())
    assert "final" in rich and "trainable" in rich, "the full figures stay in metrics/<stage>.json"
    curve = json.loads((project / "metrics/history/mimic_sparse.json").read_text())
    assert [row["step"] for row in curve] == sorted(row["step"] for row in curve) and all("loss" in row for row in curve)
    plots = dvc(project, "plots", "show", "--json")
    assert plots.returncode == 0 and "metrics/history/mimic_sparse.json" in plots.stdout, plots.stderr


def test_the_student_is_registered_with_lineage_gate_and_review(project):
    client = mlflow_client(project)
    version = client.get_model_version_by_alias("tinymod-student", "candidate")
    assert client.get_model_version_by_alias("tinymod-student", "champion").version == version.version
    tags = version.tags
    assert tags["tinymod.recipe"] == "llava-mod" and tags["tinymod.gate"] == "passed"
    assert len(tags["tinymod.git_commit"]) == 40
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    curated = next(o["md5"] for o in lock["curate"]["outs"] if o["path"] == "data/curated")
    teacher = next(o["md5"] for o in lock["teacher"]["outs"] if o["path"] == "models/teacher")
    assert tags["tinymod.dvc.curated_md5"] == curated and tags["tinymod.dvc.teacher_md5"] == teacher
    assert len(tags["tinymod.params_hash"]) == 16 and len(tags["tinymod.weights_sha256"]) == 64
    assert "pass: POPE adversarial F1" in tags["tinymod.gate_checks"] and "gate passed" in tags["tinymod.champion_reason"]

    run = client.get_run(version.run_id)
    assert any(k.startswith("student/tinymod_vqa/") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "review")}
    assert {"review/review.md", "review/eval.json", "review/data_card.md"} <= artifacts
    review = (project / "reports/review.md").read_text()
    assert "| VQA acc |" in review and "## Gate" in review and "active / total" in review and "## Training" in review
    assert review.count("| metric | teacher | student | delta |") == 1, "one header over the metrics table"
    assert f"Version {version.version}, aliases: @candidate, @champion. `champion` points to version {version.version}." in review
    data = review.split("## Data", 1)[1]
    assert "| general |" in data and "| multitask |" in data, "the data card's per-split table"
    assert version.description == review, "the card is the version's description in the registry"


def test_the_champion_loads_back_with_plain_transformers(project, monkeypatch):
    import mlflow
    from transformers import AutoModelForImageTextToText

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / '.mlflow/mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{project / '.mlflow/mlflow.db'}")
    path = mlflow.artifacts.download_artifacts("models:/tinymod-student@champion")
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True)
    assert model.config.text_config.model_type == "qwen2_moe"


def test_registering_the_same_checkpoint_again_adds_no_version(project):
    client = mlflow_client(project)
    before = len(client.search_model_versions("name='tinymod-student'"))
    out = subprocess.run([sys.executable, "-m", "tasks.register"], cwd=project, capture_output=True, text=True, check=True)
    assert "no new version" in out.stdout
    assert len(client.search_model_versions("name='tinymod-student'")) == before


def test_evaluation_outputs(project):
    scores = json.loads((project / "metrics/eval.json").read_text())
    assert set(scores["models"]) == {"teacher", "baseline", "dense", "moe", "pref"}
    pref = scores["models"]["pref"]
    assert {"pope_f1", "pope_yes_ratio", "pope_accuracy", "pope_unparsed"} <= set(pref["tasks"]["tinymod_pope_adversarial"])
    assert {"vqa_accuracy", "vqa_accuracy_count"} <= set(pref["tasks"]["tinymod_vqa"])
    assert {"chair_i", "chair_s", "partner_hallucination"} <= set(pref["tasks"]["tinymod_caption"])
    assert pref["parameters"]["active"] < pref["parameters"]["total"] and pref["decode_tokens_per_second"] > 0
    report = (project / "reports/eval.md").read_text()
    assert "| pref |" in report and ("(+" in report or "(-" in report)
    assert "## Distillation vs no teacher" in report and "POPE unparsed" in report
    assert (project / "reports/plots/eval_metrics.png").exists() and (project / "reports/plots/eval_pope.png").exists()


def test_the_flow_published_artifacts(project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def keys() -> set[str]:
        async with get_client() as client:
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="tinymod-")))
            return {a.key for a in artifacts}

    import asyncio

    found = asyncio.run(keys())
    assert {"tinymod-curate-report", "tinymod-evaluate-report", "tinymod-register-report", "tinymod-mimic-sparse-metrics"} <= found


def test_a_failing_stage_fails_the_flow_run_without_retrying(tmp_path, prefect_server):
    from flows.pipeline import distill_pipeline

    # Valid params (the file exists), but every record in it is broken: curate fails on the rejected fraction.
    root = make_project(tmp_path / "failing", {"curate": {"sources": [{"kind": "llava_json", "path": "broken.jsonl", "image_root": ".", "split": "general"}]}})
    (root / "broken.jsonl").write_text("{not json\n")
    state = distill_pipeline(workdir=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="stage curate failed"):
        state.result()


def test_flow_overrides_are_validated_before_any_work(tmp_path, prefect_server):
    from flows.pipeline import distill_pipeline

    root = make_project(tmp_path / "bad")
    before = (root / "params.yaml").read_text()
    invalid = distill_pipeline(workdir=str(root), overrides={"teacher.train.lr": -1.0}, return_state=True)
    assert invalid.is_failed()
    with pytest.raises(Exception, match="teacher.train.lr"):
        invalid.result()
    # presets/ci.yaml sets mimic_dense.steps, and presets win: the override would do nothing.
    masked = distill_pipeline(workdir=str(root), overrides={"mimic_dense.steps": 50}, return_state=True)
    with pytest.raises(Exception, match="mimic_dense.steps.*masked.*presets/ci.yaml"):
        masked.result()
    assert (root / "params.yaml").read_text() == before, "a rejected override must not touch params.yaml"
    assert not (root / "data").exists()


def test_approval_pauses_the_flow_before_champion_moves(project):
    """Last in this file: it changes the project's params (register.require_approval)."""
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    from flows.pipeline import distill_pipeline

    outcome: dict = {}
    flow = threading.Thread(
        target=lambda: outcome.update(state=distill_pipeline(workdir=str(project), overrides={"register.require_approval": True}, return_state=True))
    )
    flow.start()
    paused = None
    deadline = time.time() + 300
    with get_client(sync_client=True) as client:
        while paused is None:
            assert flow.is_alive(), f"the flow ended without pausing: {outcome}"
            assert time.time() < deadline, "the flow never paused for approval"
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            paused = runs[0] if runs else None
            time.sleep(1)
    review = mlflow_client(project).get_model_version_by_alias("tinymod-student", "candidate").tags
    assert review["tinymod.awaiting_approval"] == "true"
    resume_flow_run(paused.id, run_input={"approve": True, "note": "checked the review card"})
    flow.join(timeout=300)
    assert outcome["state"].is_completed()
    tags = mlflow_client(project).get_model_version_by_alias("tinymod-student", "champion").tags
    assert "approved by a reviewer: checked the review card" in tags["tinymod.champion_reason"]
    assert "tinymod.awaiting_approval" not in tags


def test_register_after_an_imported_teacher(project, tmp_path):
    """An import writes no steps, seconds or trainable counts: register must not need them (it raised KeyError: 'steps')."""
    import shutil

    root = tmp_path / "imported"
    # A fresh MLflow store: the project's experiment points at the project's own artifact folder.
    shutil.copytree(project, root, ignore=shutil.ignore_patterns(".cache", ".mlflow"), symlinks=True)
    trained = json.loads((root / "metrics/teacher.json").read_text())
    imported = {"source": "/checkpoints/llava-1.5-7b", "sha256": trained["sha256"], "total_parameters": trained["total"]}
    (root / "metrics/teacher.json").write_text(json.dumps(imported))
    out = subprocess.run([sys.executable, "-m", "tasks.register"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    review = (root / "reports/review.md").read_text()
    assert "| teacher | imported" in review


def test_the_llava_kd_recipe_runs_its_own_stages_and_registers_a_dense_dft_student(project, tmp_path):
    """`-p recipe=llava-kd` on a project that ran llava-mod: dvc.yaml follows the recipe, DFT's student is the final one."""
    import shutil

    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from flows.pipeline import distill_pipeline

    root = tmp_path / "kd"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns(".cache", ".mlflow"), symlinks=True)
    # The approval test before this one leaves register.require_approval set in the project.
    overrides = {"evaluate.models": ["teacher", "dft"], "register.require_approval": False}
    result = distill_pipeline(workdir=str(root), recipe="llava-kd", overrides=overrides)
    assert list(result) == ["curate", "teacher", "teacher_cache", "align", "mimic_dense", "baseline", "dft", "evaluate", "register"]
    assert result["curate"]["skipped"] and result["teacher"]["skipped"]  # they do not depend on the recipe
    assert not any(result[s]["skipped"] for s in ("align", "mimic_dense", "dft", "evaluate", "register"))
    assert list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"]) == list(result)

    dft = root / "models/student_dft"
    model = AutoModelForImageTextToText.from_pretrained(dft, use_safetensors=True)
    assert model.config.text_config.model_type == "qwen2"  # LLaVA-KD keeps the student dense
    with safe_open(str(next(dft.glob("*.safetensors"))), "pt") as weights:
        assert not any("experts" in key or "gate." in key for key in weights.keys())
    scores = json.loads((root / "metrics/eval.json").read_text())["models"]
    assert list(scores) == ["teacher", "dft"]
    assert "${paths.models}/student_dft" in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["register"]["deps"]
    version = mlflow_client(root).get_model_version_by_alias("tinymod-student", "candidate")
    assert (version.tags["tinymod.recipe"], version.tags["tinymod.model"]) == ("llava-kd", "dft")
    shown = dvc(root, "metrics", "show")
    assert "headline/dft.json" in shown.stdout and "headline/mimic_sparse.json" not in shown.stdout

