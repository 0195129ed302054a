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
