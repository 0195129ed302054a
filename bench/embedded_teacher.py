"""Retrain the embedded teacher from scratch and compare it with the shipped one (teachers/embedded).

The embedded default imports the teacher this project trained and ships
(``teacher.source: teachers/embedded``, pinned by ``teacher.sha256``), because
training it takes longer than the whole rest of the pipeline on a 2-core CPU.
This script is the proof that the shipped teacher is what ``teacher.source:
train`` makes: in a fresh copy of the pipeline it runs ``dvc repro teacher``
with ``teacher.source: train`` (tokenizer trained on the world too), scores the
shipped teacher on the same probes, and prints both with the binomial standard
error of each figure. ``--ship`` then replaces teachers/embedded with the
retrained one and pins its hash in params.yaml.

    python bench/embedded_teacher.py [--keep DIR] [--ship] [--from DIR] [--seed N] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.params import REPO, deep_merge
from tasks.teacher import HISTORY, weights_sha256
from workspace import dotted_overrides, dvc_env, make_workspace

SHIPPED = REPO / "teachers" / "embedded"
TRAIN = {"teacher": {"source": "train"}, "curate": {"tokenizer": {"source": "world"}}}
FIGURES = [
    ("VQA accuracy", ("vqa", "accuracy"), ("vqa", "n")),
    *[(f"VQA {t}", ("vqa", f"accuracy/{t}"), None) for t in ("colour", "shape", "count", "existence", "position")],
    ("POPE acc random", ("pope_random", "accuracy"), ("pope_random", "n")),
    ("POPE acc adversarial", ("pope_adversarial", "accuracy"), ("pope_adversarial", "n")),
    ("POPE yes-ratio random", ("pope_random", "yes_ratio"), ("pope_random", "n")),
    ("partner hallucination", ("caption", "partner_hallucination"), ("caption", "partner_exposed")),
    ("CHAIR-i", ("caption", "chair_i"), None),
    ("object recall", ("caption", "recall"), None),
]


def train(root: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "teacher"], cwd=root, env=dvc_env(), check=True)
    return time.perf_counter() - started


def score_shipped(root: Path) -> dict:
    """The shipped teacher on the workspace's probes, scored the way the teacher stage scores its own."""
    from model.generate import score_probes
    from tasks.params import load_params

    params = load_params(root / "params.yaml")
    return score_probes(SHIPPED, root / "data/curated/probes", root / "data/curated", params.curate.world.shapes)


def pick(probes: dict, path: tuple[str, str]) -> float:
    return probes[path[0]][path[1]]


def compare(retrained: dict, shipped: dict) -> None:
    print(f"\n{'figure':24} {'retrained':>9} {'shipped':>8} {'diff':>7} {'2 se':>6}")
    for label, path, count in FIGURES:
        a, b = pick(retrained, path), pick(shipped, path)
        two_se = 2 * math.sqrt(max(a * (1 - a), 1e-9) * 2 / pick(retrained, count)) if count else float("nan")
        print(f"{label:24} {a:9.3f} {b:8.3f} {a - b:+7.3f} {two_se:6.3f}")


def ship(root: Path) -> str:
    """Replace teachers/embedded with the workspace's teacher and pin its hash in params.yaml."""
    tmp = SHIPPED.with_name("embedded.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(root / "models/teacher", tmp)
    shutil.copy(root / "metrics/teacher.json", tmp / "tinymod_metrics.json")
    # The stage's loss curve, both phases (a run folder holds only its own phase's rows).
    rows = json.loads((root / "metrics/history/teacher.json").read_text())
    (tmp / HISTORY).write_text("".join(json.dumps(row) + "\n" for row in rows))
    shutil.rmtree(SHIPPED, ignore_errors=True)
    tmp.rename(SHIPPED)
    digest = weights_sha256(SHIPPED)
    params = REPO / "params.yaml"
    text = params.read_text()
    line = f"  sha256: {digest}   # of teachers/embedded's weights; the import refuses any other"
    text, found = re.subn(r"(?m)^  sha256: .*$", line, text)
    if not found:
        text = re.sub(r"(?m)^(teacher:\n  source: .*\n)", rf"\1{line}\n", text)
    params.write_text(text)
    return digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="train in this folder and keep it (default: a temporary one)")
    parser.add_argument("--from", dest="source", type=Path, help="reuse a workspace where the teacher was already retrained")
    parser.add_argument("--ship", action="store_true", help="replace teachers/embedded with the retrained teacher and pin its hash")
    parser.add_argument("--seed", type=int, help="teacher.seed of the retrain (default: params.yaml's): the variance of the recipe over seeds")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                        help="a params change to try, dotted key and YAML value (teacher.text.heads=8); repeatable")
    args = parser.parse_args()
    overrides = deep_merge(TRAIN, {"teacher": {"seed": args.seed}} if args.seed is not None else {})
    overrides = deep_merge(overrides, dotted_overrides(args.changes))
    with tempfile.TemporaryDirectory(prefix="tinymod-teacher-") as tmp:
        root = args.source or args.keep or Path(tmp)
        if not args.source:
            make_workspace(root, overrides)
            print(f"retraining the teacher in {root}: {train(root):.0f} s")
        retrained = json.loads((root / "metrics/teacher.json").read_text())
        if SHIPPED.exists():
            compare(retrained["probes"], score_shipped(root))
        else:
            print(f"no shipped teacher at {SHIPPED} yet")
        print("\nretrained teacher checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in retrained["checks"].items()))
        if args.ship:
            print(f"shipped to {SHIPPED}, teacher.sha256 = {ship(root)}")


if __name__ == "__main__":
    main()
