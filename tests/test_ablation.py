"""The ablation's bookkeeping: busy time, the verdicts it prints for the papers' claims, and variants that validate."""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import statistics
import sys

import pytest

from tasks.common import weights_sha256
from tasks.params import REPO, load_params

from .conftest import write_params

sys.path.insert(0, str(REPO / "bench"))  # bench scripts import their siblings (workspace), as when run as scripts
spec = importlib.util.spec_from_file_location("ablation", REPO / "bench" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def cell(*per_seed: float) -> dict:
    std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    return {"mean": statistics.fmean(per_seed), "std": std, "n": len(per_seed), "per_seed": list(per_seed)}


def test_busy_seconds_counts_overlap_once_and_skips_pauses():
    runs = [{"started": 0, "finished": 10}, {"started": 5, "finished": 12}, {"started": 100, "finished": 103}]
    assert ablation.busy_seconds(runs) == 15


def test_paired_difference_sees_through_seed_noise():
    # Seeds move both models together: unpaired the gap is within the spread, paired it wins every seed.
    ours, theirs = cell(0.45, 0.40, 0.50), cell(0.43, 0.38, 0.48)
    assert ablation.paired(ours, theirs, "VQA acc") == " (better in 3 of 3 seeds, by +0.020 ± 0.000)"
    # CHAIR: lower is better, so a higher value loses.
    assert "better in 0 of 3 seeds, by -0.020" in ablation.paired(ours, theirs, "CHAIR-i")
    # A single teacher row is compared with every seed.
    assert "better in 2 of 3 seeds" in ablation.paired(ours, cell(0.42), "VQA acc")


def test_claim_verdicts():
    columns = {c: cell(0.3, 0.3, 0.3) for c in ablation.HIGHER}
    rows = {
        "teacher": {**columns, "CHAIR-i": cell(0.05), "partner halluc.": cell(0.6)},
        "(1) no teacher": {**columns, "VQA acc": cell(0.30, 0.31, 0.29)},
        "(2) dense KD": {**columns, "VQA acc": cell(0.50, 0.51, 0.49)},
        "(3) MoE KD": {**columns, "VQA acc": cell(0.50, 0.51, 0.49), "object recall": cell(0.90, 0.91, 0.89)},
        "(4) + preference": {
            **columns,
            "CHAIR-i": cell(0.20, 0.21, 0.19),
            "partner halluc.": cell(0.10, 0.12, 0.11),
            "VQA acc": cell(0.495, 0.515, 0.48),  # a little lower, inside the spread: no loss
            "object recall": cell(0.70, 0.71, 0.69),  # lower beyond the spread: a loss
        },
    }
    rows["(3') MoE KD, live teacher"] = {**columns, "VQA acc": cell(0.51, 0.50, 0.50), "object recall": cell(0.80, 0.81, 0.79)}
    lines = "\n".join(ablation.claims(rows))
    assert "VQA acc 0.500 vs 0.503: the same within the seeds' spread" in lines
    assert "object recall 0.900 vs 0.800: better beyond the seeds' spread" in lines
    assert "VQA acc 0.500 vs 0.300: holds" in lines
    assert "CHAIR-i 0.200 vs 0.050: does not hold" in lines
    assert "partner halluc. 0.110 vs 0.600: holds" in lines
    assert "POPE acc adv 0.300 vs 0.300: within the seeds' spread" in lines
    assert "VQA acc 0.497 vs 0.500: no loss" in lines
    assert "object recall 0.700 vs 0.900: a loss beyond the seeds' spread" in lines
    assert "(b)" not in lines and "(d)" not in lines  # rows (5) and (6) are missing: those claims are left out, not guessed


def test_a_one_seed_run_reports_the_difference_without_a_verdict():
    columns = {c: cell(0.3) for c in ablation.HIGHER}
    rows = {"(1) no teacher": {**columns, "VQA acc": cell(0.30)}, "(2) dense KD": {**columns, "VQA acc": cell(0.50), "CHAIR-i": cell(0.4)}}
    lines = "\n".join(ablation.claims(rows))
    assert "VQA acc 0.500 vs 0.300: +0.200 in its favour, one seed (no spread to judge by)" in lines
    assert "CHAIR-i 0.400 vs 0.300: -0.100 in its favour, one seed" in lines
    assert "holds" not in lines and "does not hold" not in lines


def test_the_reproduce_line_names_what_is_not_default_and_quotes_values_for_a_shell():
    args = argparse.Namespace(seeds=[0], variants=ablation.DEFAULT_VARIANTS, name="ablation_x", changes=["mimic_dense.fraction={general: 1.0, multitask: 0.1}", "mimic_dense.steps=750"])
    command = ablation.reproduce_command(args)
    assert command.startswith("python bench/ablation.py --seeds 0 --name ablation_x --set ") and "--variants" not in command
    assert shlex.split(command)[-3:] == ["mimic_dense.fraction={general: 1.0, multitask: 0.1}", "--set", "mimic_dense.steps=750"]


def test_set_changes_nest_by_their_dotted_key_and_a_malformed_one_is_refused():
    from workspace import dotted_overrides

    assert dotted_overrides(["mimic_dense.steps=1000", "mimic_dense.lr=0.003", "upcycle.layers=[1, 3]"]) == {
        "mimic_dense": {"steps": 1000, "lr": 0.003},
        "upcycle": {"layers": [1, 3]},
    }
    for malformed in ("mimic_dense.steps", "=3"):
        with pytest.raises(SystemExit, match="expected KEY=VALUE"):
            dotted_overrides([malformed])


@pytest.mark.parametrize("variant", sorted(ablation.VARIANTS))
def test_every_variant_is_a_valid_pipeline_and_its_student_llm_is_the_pinned_one(variant, tmp_path):
    overrides, _, models = ablation.VARIANTS[variant]
    params = load_params(write_params(tmp_path, overrides))
    assert set(models) <= set(params.evaluated_models)
    if params.align.student.llm != "init":  # a stale pin in bench/ablation.py would fail the variant at its align stage
        assert weights_sha256(REPO / params.align.student.llm) == params.align.student.sha256


def test_training_fit_averages_the_last_rows_and_leaves_out_a_term_the_stage_did_not_log():
    spec = importlib.util.spec_from_file_location("training_fit", REPO / "bench" / "training_fit.py")
    training_fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(training_fit)
    history = [{"step": 10 * i, "ce": float(i), "loss": 2.0 * i} for i in range(1, 6)]
    assert training_fit.fit(history, ["ce", "kl_response"], last=2) == {"ce": 4.5}
