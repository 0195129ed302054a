"""Each training stage end to end on tiny models: real DeepSpeed jobs, MLflow runs, HF checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from tasks import align, curate, mimic_dense, mimic_sparse, preference, teacher, upcycle

from .conftest import TINY_PIPELINE, write_params

STAGES = [("curate", curate), ("teacher", teacher), ("align", align), ("mimic_dense", mimic_dense),
          ("upcycle", upcycle), ("mimic_sparse", mimic_sparse), ("preference", preference)]  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A tiny project folder with every stage up to preference run once, in order."""
    root = tmp_path_factory.mktemp("pipeline")
    write_params(root, TINY_PIPELINE)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for name, module in STAGES:
            assert module.main(["--params", "params.yaml"]) == 0, f"stage {name} failed"
    finally:
        os.chdir(cwd)
    return root


def test_every_stage_writes_a_plain_transformers_checkpoint(pipeline):
    for name in ("teacher", "student_align", "student_dense", "student_upcycled", "student_moe", "student_pref"):
        folder = pipeline / "models" / name
        assert (folder / "model.safetensors").exists(), name
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")), f"{name}: pickled weights"
        model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True)
        expected = "qwen2_moe" if name in ("student_upcycled", "student_moe", "student_pref") else "qwen2"
        assert model.config.text_config.model_type == expected


def test_training_changes_only_the_modules_a_stage_trains(pipeline):
    """llava-mod: align trains the projector only; the vision tower never changes after the teacher."""
    teacher = load_file(pipeline / "models/teacher/model.safetensors")
    init = load_file(pipeline / ".cache/runs/align/init/model.safetensors")
    aligned = load_file(pipeline / "models/student_align/model.safetensors")
    # Checkpoints keep LLaVA's on-disk key layout (vision_tower.*, multi_modal_projector.*, language_model.*).
    for key in aligned:
        if key.startswith("vision_tower."):
            assert torch.equal(aligned[key], teacher[key]), key
        moved = not torch.equal(aligned[key], init[key])
        assert moved == key.startswith("multi_modal_projector."), key


def test_stage_metrics_and_mlflow_runs(pipeline):
    from mlflow.tracking import MlflowClient

    for stage in ("teacher", "align", "mimic_dense", "mimic_sparse", "preference"):
        metrics = json.loads((pipeline / "metrics" / f"{stage}.json").read_text())
        assert metrics["steps"] > 0 and metrics["trainable"] > 0 and "loss" in metrics["final"]
        assert (pipeline / "reports" / "plots" / f"{stage}_loss.png").exists()
    sparse = json.loads((pipeline / "metrics/mimic_sparse.json").read_text())
    assert sparse["active_parameters"] < sparse["total_parameters"]
    assert {"kl_response", "router_aux"} <= set(sparse["final"])
    assert json.loads((pipeline / "metrics/upcycle.json").read_text())["max_abs_logit_difference"] < 1e-4
    pref = json.loads((pipeline / "metrics/preference.json").read_text())
    assert {"reward_accuracy", "reward_margin", "policy_chosen_logps", "reference_chosen_logps"} <= set(pref["final"])
    assert set(pref["hallucination"]["before"]) == {"chair_i", "chair_s", "pope_adversarial_f1", "vqa_accuracy"}

    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline / '.mlflow/mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("tinymod").experiment_id)
    by_stage = {r.data.tags["tinymod.stage"]: r for r in runs}
    assert {"teacher", "align", "mimic_dense", "mimic_sparse", "preference"} <= set(by_stage)
    align_run = by_stage["align"]
    assert align_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(align_run.info.run_id, "train/loss")] == [1, 2]
    assert align_run.data.params["world_size"] == "2"


def test_a_failing_job_fails_the_stage_with_its_log(pipeline, capsys):
    params_file = write_params(pipeline / "broken", {**TINY_PIPELINE, "paths": {"data": "../data", "models": "../models"}})
    cwd = os.getcwd()
    os.chdir(params_file.parent)
    try:
        (Path("..") / "models/student_align/model.safetensors").rename("aside.safetensors")
        assert mimic_dense.main(["--params", "params.yaml"]) == 1
    finally:
        Path("aside.safetensors").rename(Path("..") / "models/student_align/model.safetensors")
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "mimic_dense failed" in err and "exited with code" in err and "last lines of" in err


def test_sigkill_mid_stage_then_rerun_resumes_to_the_same_weights(pipeline):
    """Kill the job at a checkpoint with SIGKILL, re-run the stage: same final weights as uninterrupted."""
    overrides = {**TINY_PIPELINE, "mimic_dense": {**TINY_PIPELINE["mimic_dense"], "steps": 8, "checkpoint_every": 2}}
    write_params(pipeline, overrides)
    try:
        run = [sys.executable, "-m", "tasks.mimic_dense"]
        subprocess.run(run, cwd=pipeline, check=True, capture_output=True)
        uninterrupted = load_file(pipeline / "models/student_dense/model.safetensors")

        process = subprocess.Popen(run, cwd=pipeline, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        latest = pipeline / ".cache/runs/mimic_dense/checkpoints/latest"
        deadline = time.time() + 240
        while not (latest.exists() and latest.read_text().strip() >= "step0000004"):
            assert process.poll() is None, "the stage ended before it could be killed"
            assert time.time() < deadline, "no checkpoint at step 4 in time"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        state = json.loads((pipeline / ".cache/runs/mimic_dense/state.json").read_text())
        assert not state.get("finished")

        out = subprocess.run(run, cwd=pipeline, check=True, capture_output=True, text=True)
        assert "resumed from the checkpoint at step" in out.stdout
        resumed = load_file(pipeline / "models/student_dense/model.safetensors")
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6), key
        assert json.loads((pipeline / "metrics/mimic_dense.json").read_text())["resumed_at"] >= 4
    finally:
        write_params(pipeline, TINY_PIPELINE)


def test_params_are_validated_before_any_work(tmp_path, capsys):
    write_params(tmp_path, {**TINY_PIPELINE, "mimic_dense": {"steps": 0, "colour": 1}})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert mimic_dense.main(["--params", "params.yaml"]) == 1
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "mimic_dense.steps" in err and "mimic_dense.colour" in err
    assert not (tmp_path / ".cache").exists(), "nothing may start before params validate"
