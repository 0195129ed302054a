"""Fresh copies of the pipeline, for experiments, benchmarks and tests (no stage imports this).

``make_workspace(root, overrides)`` copies this checkout's pipeline (code,
params, recipes, presets, infra) into ``root`` with ``overrides``
merged into its params.yaml and dvc.yaml rendered from them, and initialises git and DVC there, so ``dvc repro``
in ``root`` runs the whole pipeline without touching this checkout's data,
models, MLflow store or DVC cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.params import REPO, ParamsError, deep_merge, load_params
from tasks.stages import dump, render
from tasks.training import TORCH_EXTENSIONS

PIPELINE_FILES = ("dvc.yaml", "params.yaml", "prefect.yaml", ".dvcignore", ".gitignore", "recipes", "presets", "infra", "model", "tasks", "flows", "teachers", "students")
_GIT_IDENTITY = {"GIT_AUTHOR_NAME": "tinymod", "GIT_AUTHOR_EMAIL": "tinymod@localhost", "GIT_COMMITTER_NAME": "tinymod", "GIT_COMMITTER_EMAIL": "tinymod@localhost"}


def dotted_overrides(changes: list[str]) -> dict:
    """The bench scripts' ``--set`` changes merged: ``["teacher.text.heads=8"]`` as ``{"teacher": {"text": {"heads": 8}}}``."""
    merged: dict = {}
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {change!r}: expected KEY=VALUE, e.g. teacher.text.heads=8")
        override: dict = yaml.safe_load(value)
        for part in reversed(key.split(".")):
            override = {part: override}
        merged = deep_merge(merged, override)
    return merged


def write_params(root: Path, overrides: dict | None = None) -> Path:
    """``root/params.yaml``: this checkout's params.yaml with ``overrides`` merged in."""
    data = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides or {})
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_workspace(root: Path, overrides: dict | None = None) -> Path:
    """A copy of the pipeline under ``root`` (git + DVC initialised) with ``overrides`` in its params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            shutil.copy(source, root / name)
    params_file = write_params(root, overrides)
    try:
        (root / "dvc.yaml").write_text(dump(render(load_params(params_file), root)))  # the overrides' recipe decides the stages
    except ParamsError:
        pass  # invalid on purpose (a test of validation): every stage refuses it before any work
    env = {**dvc_env(), **_GIT_IDENTITY}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "workspace"]):
        subprocess.run(command, cwd=root, check=True, env=env, capture_output=True)
    return root


def dvc_env() -> dict[str, str]:
    """The environment for running ``dvc`` so that stage commands find this interpreter as ``python``.

    Workspaces share this checkout's DeepSpeed op build (``make setup`` makes it), rather than
    compiling it again in each.
    """
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1", "TORCH_EXTENSIONS_DIR": str(TORCH_EXTENSIONS)}
