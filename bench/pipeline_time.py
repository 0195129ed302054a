"""The embedded default end to end with `dvc repro` in a fresh workspace, then a no-op re-run.

Prints each stage's wall time, the total, and the no-op time (targets: under 10 minutes,
and under 15 seconds). Runs in a temporary copy, so this checkout's outputs are untouched.

    python bench/pipeline_time.py [--preset embedded|ci] [--keep DIR]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workspace import dvc_env, make_workspace


def repro(root: Path) -> tuple[float, dict[str, float]]:
    """Run `dvc repro`, streaming its output; returns the total and each stage's seconds."""
    started = time.perf_counter()
    stages: dict[str, float] = {}
    current, since = None, started
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=root, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        match = re.match(r"Running stage '(\w+)'", line)
        if match:
            now = time.perf_counter()
            if current:
                stages[current] = now - since
            current, since = match.group(1), now
    if process.wait() != 0:
        raise SystemExit(f"dvc repro failed in {root}")
    end = time.perf_counter()
    if current:
        stages[current] = end - since
    return end - started, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_workspace(args.keep or Path(tmp) / "tinymod", {"preset": args.preset})
        total, stages = repro(root)
        noop, _ = repro(root)
    print(f"\npreset {args.preset}: dvc repro from scratch {total:.0f} s ({total / 60:.1f} min)")
    for stage, seconds in stages.items():
        print(f"  {stage:<14} {seconds:7.1f} s")
    print(f"no-op re-run: {noop:.1f} s")


if __name__ == "__main__":
    main()
