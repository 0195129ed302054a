"""Shared fixtures: tiny params and tiny datasets, written under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tasks.params import Params, deep_merge, load_params

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent

TINY_WORLD = {
    "curate": {"world": {"images": {"general": 40, "multitask": 40, "preference": 20, "probes": 10}}},
}


def write_params(root: Path, overrides: dict | None = None) -> Path:
    """A params.yaml under ``root``: the repo's params.yaml with ``overrides`` merged in."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    data = deep_merge(base, overrides or {})
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    return load_params(write_params(tmp_path, TINY_WORLD))


TINY_VISION = {"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2}
TINY_TEXT = {"family": "qwen2", "hidden_size": 32, "intermediate_size": 64, "layers": 4, "heads": 4, "kv_heads": 2}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few world sentences, with the chat template and <image>."""
    from model.tokenizer import train_tokenizer

    texts = ["A small red circle at the top left.", "Is there a star in the image?", "yes", "no", "two", "user", "assistant"]
    return train_tokenizer(texts * 20, vocab_size=300)


@pytest.fixture
def tiny_llava(tiny_tokenizer):
    """A randomly initialised 16-px LLaVA with a 4-layer Qwen2 text model (4 image tokens)."""
    from model.builders import build_llava
    from tasks.params import TextParams, VisionParams

    return build_llava(VisionParams(**TINY_VISION), TextParams(**TINY_TEXT), tiny_tokenizer, seed=0).eval()


# A whole pipeline small enough for CI: a 24-px world (3x3 patches of 8 px), 1-layer vision tower,
# 2-layer LLMs, a few steps per stage. Stages run for real (DeepSpeed jobs, MLflow, checkpoints).
TINY_PIPELINE = {
    "tracking": {"system_metrics": False},
    "curate": {
        "world": {"image_size": 24, "images": {"general": 60, "multitask": 60, "preference": 24, "probes": 8}},
        "image_tokens": 9,
        "max_tokens": 256,
    },
    "teacher": {
        "vision": {"image_size": 24, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "layers": 1, "heads": 2},
        "text": {"hidden_size": 48, "intermediate_size": 96, "layers": 2, "heads": 4, "kv_heads": 2},
        "vision_pretrain": {"steps": 5, "batch_size": 16},
        "train": {"steps": 4, "batch_size": 8, "micro_batch_size": 8, "checkpoint_every": 2, "log_every": 2, "warmup_steps": 1},
    },
    "align": {
        "student": {"text": {"hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 4, "kv_heads": 2}},
        "steps": 2, "batch_size": 8, "micro_batch_size": 2, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1,
        "fraction": 0.5, "world_size": 2,
    },
    "mimic_dense": {"steps": 3, "batch_size": 8, "micro_batch_size": 4, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1, "fraction": 0.5},
    "upcycle": {"num_experts": 4, "top_k": 2, "layers": "every_other"},
    "mimic_sparse": {"steps": 2, "batch_size": 8, "micro_batch_size": 8, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1, "zero_stage": 3},
    "preference": {"steps": 2, "batch_size": 8, "micro_batch_size": 8, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1},
    "evaluate": {"limit": 8},
}  # fmt: skip
