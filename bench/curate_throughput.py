"""Curate throughput on ~10,000 embedded records: records/s for the whole stage and for the checks alone.

    python bench/curate_throughput.py [--records 10000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from tasks.common import StagePaths
from tasks.curate import curate
from tasks.params import REPO, deep_merge, load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    args = parser.parse_args()
    # One probe image yields ~20 probe records (3 POPE splits x ~6 questions, VQA, a caption).
    images = max(1, args.records // 4)
    counts = {"general": images, "multitask": images, "preference": images // 5, "probes": images // 10}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = yaml.safe_load((REPO / "params.yaml").read_text())
        data = deep_merge(base, {"curate": {"world": {"images": counts}}})
        (root / "params.yaml").write_text(yaml.safe_dump(data))
        params = load_params(root / "params.yaml")
        started = time.perf_counter()
        metrics = curate(params, StagePaths(params, root), show_progress=False)
        seconds = time.perf_counter() - started
        print(f"records: {metrics['in']} (kept {metrics['kept']})")
        print(f"curate stage, world generation + drawing included: {seconds:.1f} s, {metrics['in'] / seconds:,.0f} records/s")

        # The same records again, read as plain LLaVA JSONL from the generated world: the checks alone.
        world = root / "data" / "world"
        sources = [
            {"kind": "llava_json", "path": str(world / f"{split}.jsonl"), "image_root": str(world), "split": split}
            for split in ("general", "multitask")
        ]
        sources.append({"kind": "preference", "path": str(world / "preference.jsonl"), "image_root": str(world)})
        again = root / "again"
        again.mkdir()
        data = deep_merge(data, {"curate": {"sources": sources}})
        (again / "params.yaml").write_text(yaml.safe_dump(data))
        params = load_params(again / "params.yaml")
        started = time.perf_counter()
        metrics = curate(params, StagePaths(params, again), show_progress=False)
        seconds = time.perf_counter() - started
        print(
            f"checks alone (LLaVA JSONL in, {metrics['in']} records: decode, hash, copy, tokenize): "
            f"{seconds:.1f} s, {metrics['in'] / seconds:,.0f} records/s"
        )


if __name__ == "__main__":
    main()
