"""Every shipped infra config and template parses: DeepSpeed, Prefect, Kubernetes (params files: test_params.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tasks.params import load_params
from tasks.training import deepspeed_config, launch_command

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_configs_fill_in(stage):
    section = load_params(REPO / "params.yaml").mimic_dense.model_copy(update={"zero_stage": stage, "world_size": 2, "micro_batch_size": 4})
    config = deepspeed_config(section)
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_batch_size"] == config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * 2


def test_hostfile_template_and_multi_node_launch():
    lines = [line.split() for line in (REPO / "infra/deepspeed/hostfile.example").read_text().splitlines() if line and not line.startswith("#")]
    assert lines and all(len(parts) == 2 and parts[1].startswith("slots=") and int(parts[1][6:]) > 0 for parts in lines)
    section = load_params(REPO / "params.yaml").mimic_sparse.model_copy(update={"launcher": "deepspeed", "hostfile": "infra/deepspeed/hostfile.example"})
    command = launch_command(Path("job.json"), section)
    assert command[command.index("--hostfile") + 1] == "infra/deepspeed/hostfile.example" and "--num_gpus" not in command


def test_kubernetes_work_pool_template():
    template = json.loads((REPO / "infra/k8s/work-pool-template.json").read_text())
    manifest = template["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    variables = template["variables"]["properties"]
    # Every {{ placeholder }} is a declared variable.
    text = json.dumps(template["job_configuration"])
    assert set(re.findall(r"{{ (\w+) }}", text)) <= set(variables)


def test_prefect_deployment_file():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = config["deployments"]
    assert deployment["name"] == "local" and deployment["work_pool"]["name"] == "tinymod-local"
    module, function = deployment["entrypoint"].split(":")
    assert (REPO / module).exists() and f"def {function}(" in (REPO / module).read_text()


def test_the_flow_logs_each_stages_own_summary_lines_not_its_progress_bars():
    from flows.pipeline import stage_summary

    output = (
        "Running stage 'mimic_dense':\n> python -m tasks.mimic_dense\n"
        "mimic_dense:  10%|#   | 50/500 [00:10<01:30]\rmimic_dense: 100%|####| 500/500 [01:40<00:00]\n"
        "[WARNING] something from a library\nmimic_dense: 500 steps in 100 s (160 samples/s); loss 1.23\n"
        "align: not this stage\nUpdating lock file 'dvc.lock'\n"
    )
    assert stage_summary(output, "mimic_dense") == ["mimic_dense: 500 steps in 100 s (160 samples/s); loss 1.23"]


def test_model_code_never_imports_tasks():
    """Imports run one way: tasks/ builds on model/, model/ knows nothing of the stages."""
    import ast

    upward = []
    for path in sorted((REPO / "model").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            upward += [f"{path.relative_to(REPO)}: {name}" for name in names if name == "tasks" or name.startswith("tasks.")]
    assert not upward, upward


def test_resume_state_resumes_only_the_same_unfinished_spec(tmp_path, capsys):
    from tasks.training import ResumeState

    run = tmp_path / "mimic_dense"
    run.mkdir()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step0000004")
    first = ResumeState.open(run, "abc", "mimic_dense")
    assert first.mlflow_run_id is None and not (run / "checkpoints").exists(), "no state of this spec: a clean folder"
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step0000004")
    (run / "init_metrics.json").write_text("{}")
    first.mlflow_run_id = "run-1"
    first.save()
    again = ResumeState.open(run, "abc", "mimic_dense")
    assert again.mlflow_run_id == "run-1" and (run / "init_metrics.json").exists(), "the interrupted attempt of this spec is kept"
    assert "resuming it" in capsys.readouterr().out
    changed = ResumeState.open(run, "def", "mimic_dense")
    assert changed.mlflow_run_id is None and not (run / "init_metrics.json").exists()
    assert "params or inputs changed" in capsys.readouterr().out
    changed.finish()
    assert ResumeState.open(run, "def", "mimic_dense").mlflow_run_id is None, "a finished attempt is never resumed"
