"""Each stage end to end on the CI preset: real DeepSpeed jobs, MLflow runs, HF checkpoints, resume after SIGKILL."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from tasks import mimic_dense
from tasks.params import load_params

from .conftest import write_params


def test_every_stage_writes_a_plain_transformers_checkpoint(project):
    for name in ("teacher", "student_align", "student_dense", "student_upcycled", "student_moe", "student_pref"):
        folder = project / "models" / name
        assert (folder / "model.safetensors").exists(), name
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")), f"{name}: pickled weights"
        model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True)
        expected = "qwen2_moe" if name in ("student_upcycled", "student_moe", "student_pref") else "qwen2"
        assert model.config.text_config.model_type == expected


def test_training_changes_only_the_modules_a_stage_trains(project):
    """llava-mod: align trains the projector only; the vision tower never changes after the teacher."""
    teacher = load_file(project / "models/teacher/model.safetensors")
    init = load_file(project / ".cache/runs/align/init/model.safetensors")
    aligned = load_file(project / "models/student_align/model.safetensors")
    # Checkpoints keep LLaVA's on-disk key layout (vision_tower.*, multi_modal_projector.*, language_model.*).
    for key in aligned:
        if key.startswith("vision_tower."):
            assert torch.equal(aligned[key], teacher[key]), key
        moved = not torch.equal(aligned[key], init[key])
        assert moved == key.startswith("multi_modal_projector."), key


def test_stage_metrics_and_mlflow_runs(project):
    from mlflow.tracking import MlflowClient

    for stage in ("teacher", "align", "mimic_dense", "mimic_sparse", "preference"):
        metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
        assert metrics["steps"] > 0 and metrics["trainable"] > 0 and "loss" in metrics["final"]
        assert (project / "reports" / "plots" / f"{stage}_loss.png").exists()
    word_align = json.loads((project / "metrics/align.json").read_text())["word_align"]
    assert word_align["steps"] == 5 and set(word_align["held_out_cell_accuracy"]) == {"shape", "colour", "size", "position"}
    sparse = json.loads((project / "metrics/mimic_sparse.json").read_text())
    assert sparse["active_parameters"] < sparse["total_parameters"]
    assert {"kl_response", "router_aux"} <= set(sparse["final"])
    assert json.loads((project / "metrics/upcycle.json").read_text())["max_abs_logit_difference"] < 1e-4
    pref = json.loads((project / "metrics/preference.json").read_text())
    assert {"reward_accuracy", "reward_margin", "policy_chosen_logps", "reference_chosen_logps"} <= set(pref["final"])
    assert set(pref["hallucination"]["before"]) == {"chair_i", "chair_s", "pope_adversarial_f1", "vqa_accuracy"}

    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.mlflow/mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("tinymod").experiment_id)
    by_stage = {r.data.tags["tinymod.stage"]: r for r in runs}
    assert {"teacher", "align", "mimic_dense", "mimic_sparse", "preference", "evaluate", "register"} <= set(by_stage)
    align_run = by_stage["align"]
    assert align_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(align_run.info.run_id, "train/loss")] == [1, 2]
    assert align_run.data.params["world_size"] == "2"
    assert by_stage["mimic_sparse"].data.params["zero_stage"] == "3"
    # One pipeline run's stage runs share a tag; each training run holds its checkpoint and throughput.
    assert len({by_stage[s].data.tags["tinymod.pipeline_run"] for s in by_stage}) == 1
    for stage in ("teacher", "mimic_sparse", "preference"):
        run_id = by_stage[stage].info.run_id
        assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "model")}
        assert {"train/grad_norm", "train/samples_per_second", "train/tokens_per_second", "train/lr"} <= set(by_stage[stage].data.metrics)


def copy_inputs(project: Path, root: Path, *names: str) -> Path:
    """A fresh folder with the project's params and the given data/model folders (for stages run apart)."""
    root.mkdir()
    shutil.copy(project / "params.yaml", root / "params.yaml")
    # The project's MLflow store, already migrated: a fresh SQLite store costs many seconds of schema setup.
    for name in (*names, ".mlflow"):
        shutil.copytree(project / name, root / name)
    return root


def test_the_teacher_trains_in_two_phases_and_a_rerun_reuses_the_first(project, tmp_path):
    """Phase 2 starts from phase 1's weights; the stage's loss curve holds both; a rerun (after a crash in
    phase 2, say) does not redo phase 1 and makes the very same teacher."""
    metrics = json.loads((project / "metrics/teacher.json").read_text())
    phase1, params = metrics["phase1"], load_params(project / "params.yaml")
    assert (phase1["steps"], metrics["steps"]) == (params.teacher.train.steps, params.teacher.lookup.steps)
    assert "vision_pretrain" in phase1 and "probes" in metrics and "probes" not in phase1
    steps = [row["step"] for row in json.loads((project / "metrics/history/teacher.json").read_text())]
    assert steps == sorted(steps) and steps[-1] == phase1["steps"] + metrics["steps"]
    root = copy_inputs(project, tmp_path / "again", "data/curated", "models/tokenizer", ".cache/runs/teacher_phase1")
    out = subprocess.run([sys.executable, "-m", "tasks.teacher"], cwd=root, check=True, capture_output=True, text=True)
    assert "teacher_phase1: finished before with the same spec; reusing" in out.stdout
    again, first = load_file(root / "models/teacher/model.safetensors"), load_file(project / "models/teacher/model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_a_failing_job_fails_the_stage_with_its_log(project, tmp_path, capsys, monkeypatch):
    root = copy_inputs(project, tmp_path / "broken", "data/curated", "data/teacher_cache", "models/teacher", "models/student_align")
    (root / "models/student_align/model.safetensors").write_bytes(b"not safetensors")
    monkeypatch.chdir(root)
    assert mimic_dense.main(["--params", "params.yaml"]) == 1
    err = capsys.readouterr().err
    assert "mimic_dense failed" in err and "exited with code" in err and "last lines of" in err


def test_params_are_validated_before_any_work(tmp_path, capsys, monkeypatch):
    write_params(tmp_path, {"mimic_dense": {"steps": 0, "colour": 1}})
    monkeypatch.chdir(tmp_path)
    assert mimic_dense.main(["--params", "params.yaml"]) == 1
    err = capsys.readouterr().err
    assert "mimic_dense.steps" in err and "mimic_dense.colour" in err
    assert not (tmp_path / ".cache").exists(), "nothing may start before params validate"


def test_a_few_dpo_steps_raise_the_policy_margin_above_the_reference(project):
    """On the project's preference pairs, with the teacher as the reference model."""
    from transformers import AutoProcessor, AutoTokenizer

    from model.builders import load_llava
    from model.data import Collator, PreferenceDataset
    from model.config import DPOParams
    from model.engine import LiveTeacher, select_trainable

    from .test_engine import objective_of

    torch.manual_seed(0)
    records = [json.loads(line) for line in (project / "data/curated/preference.jsonl").read_text().splitlines()][:16]
    student_dir = project / "models/student_moe"
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    processor = AutoProcessor.from_pretrained(student_dir)
    student = load_llava(student_dir)
    dataset = PreferenceDataset(records, project / "data/curated", tokenizer, processor.image_processor, student.config.image_seq_length)
    batch = Collator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    reference = LiveTeacher(load_llava(project / "models/teacher"))

    def reference_logps(side: str) -> torch.Tensor:
        ids, mask, labels = batch.side(side)
        return reference.sequence_logprobs(ids, batch.pixel_values, mask, labels)

    batch.reference_logps = torch.stack([reference_logps("chosen"), reference_logps("rejected")], dim=1)
    select_trainable(student, ["projector", "experts", "router", "mlp"])
    objective = objective_of(student, reference, preference=DPOParams(beta=0.1, loss_type="sigmoid", sft_weight=0.0), dpo=1.0)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-3)

    def margin() -> float:
        """mean over pairs of (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))."""
        terms = objective(batch)
        policy = terms["policy_chosen_logps"] - terms["policy_rejected_logps"]
        ref = terms["reference_chosen_logps"] - terms["reference_rejected_logps"]
        return float(policy - ref)

    before = margin()
    for _ in range(8):
        loss = objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = margin()
    assert after > before and after > 0, (before, after)
