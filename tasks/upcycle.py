"""Stage `upcycle`: the dense student becomes a sparse Mixture-of-Experts student, exactly.

Each chosen layer's FFN is copied into ``num_experts`` experts of the stock
Qwen2-MoE / Qwen3-MoE layout with a new router (top-k, renormalised), so the
MoE student computes what the dense one did. The stage checks that on real
curated batches before it writes anything, and records total and active
parameters of both models.

Run: ``python -m tasks.upcycle [--params params.yaml]``
"""

from __future__ import annotations

import itertools
import sys

import torch
from transformers import AutoProcessor, AutoTokenizer

from model.builders import load_llava, save_checkpoint
from model.data import Collator, ConversationDataset
from model.upcycle import moe_layers, parameter_counts, upcycle
from tasks.common import StageFailure, StagePaths, read_jsonl, run_stage, write_json
from tasks.params import Params

EXACT_ATOL = 1e-4  # float32 logits of the dense and MoE students at upcycling time
CHECK_RECORDS = 16


def upcycle_stage(params: Params, paths: StagePaths) -> dict:
    source = paths.student("dense")
    dense = load_llava(source).eval()
    moe = upcycle(dense, params.upcycle, params.seed).eval()
    difference = max_logit_difference(dense, moe, paths, source)
    if difference > EXACT_ATOL:
        raise StageFailure(
            f"upcycling is not exact: logits differ by {difference:.2e} (> {EXACT_ATOL:g}) on curated records; "
            "nothing was written. This is a bug: please report it with params.yaml's upcycle section."
        )
    save_checkpoint(moe, AutoProcessor.from_pretrained(source), paths.student("upcycled"))
    text = moe.config.text_config
    metrics = {
        "architecture": text.model_type,
        "num_experts": params.upcycle.num_experts,
        "top_k": params.upcycle.top_k,
        "moe_layers": moe_layers(params.upcycle.layers, text.num_hidden_layers),
        "max_abs_logit_difference": difference,
        "dense": parameter_counts(dense),
        "moe": parameter_counts(moe),
    }
    write_json(paths.metrics / "upcycle.json", metrics)
    return metrics


@torch.no_grad()
def max_logit_difference(dense, moe, paths: StagePaths, checkpoint) -> float:
    """Largest |logit difference| between the two models on the first multitask records."""
    records = list(itertools.islice(read_jsonl(paths.split("multitask")), CHECK_RECORDS))
    if not records:
        raise StageFailure(f"{paths.split('multitask')} is empty: nothing to check upcycling on")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    image_processor = AutoProcessor.from_pretrained(checkpoint).image_processor
    dataset = ConversationDataset(records, paths.curated, tokenizer, image_processor, dense.config.image_seq_length)
    batch = Collator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    inputs = batch.model_inputs()
    return (dense(**inputs).logits - moe(**inputs).logits).abs().max().item()


def summary(metrics: dict) -> str:
    return (
        f"{metrics['architecture']} with {metrics['num_experts']} experts (top-{metrics['top_k']}) in layers {metrics['moe_layers']};"
        f" {metrics['moe']['total']:,} parameters ({metrics['moe']['active']:,} active) from {metrics['dense']['total']:,};"
        f" max logit difference {metrics['max_abs_logit_difference']:.1e}"
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage("upcycle", upcycle_stage, __doc__, argv, summary)


if __name__ == "__main__":
    sys.exit(main())
