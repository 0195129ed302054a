"""Shared fixtures: tiny params and tiny datasets, written under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.params import Params, load_params
from tasks.workspace import make_workspace, write_params  # noqa: F401 - tests import write_params from here

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent

# Outside the repo there is no shipped teacher: tiny projects train their tokenizer (and teacher) on the world.
TINY_WORLD = {
    "curate": {"world": {"images": {"general": 40, "multitask": 40, "preference": 20, "probes": 10}}, "tokenizer": {"source": "world"}},
    "teacher": {"source": "train"},
}


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



def make_project(root: Path, overrides: dict | None = None) -> Path:
    """A copy of this repo's pipeline with ``preset: ci``."""
    return make_workspace(root, {"preset": "ci", **(overrides or {})})


@pytest.fixture(scope="session")
def prefect_server():
    """A throwaway Prefect API for the whole session (~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def project(tmp_path_factory, prefect_server) -> Path:
    """The CI preset run once end to end through the `distill-pipeline` flow (every stage a real DVC stage)."""
    from flows.pipeline import distill_pipeline

    root = make_project(tmp_path_factory.mktemp("project"))
    state = distill_pipeline(workdir=str(root), return_state=True)
    assert state.is_completed(), f"the flow failed: {state.message}"
    return root
