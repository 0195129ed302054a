"""Curate throughput: records/s and peak memory, on the embedded world and on LLaVA-665k-shaped JSON.

    python bench/curate_throughput.py [--records 10000]          # the embedded world, and its records re-read as JSONL
    python bench/curate_throughput.py --llava 100000 200000      # synthetic LLaVA-665k-shaped JSON lists of these sizes

The ``--llava`` files are one JSON list each, as ``llava_v1_5_mix665k.json`` is: multi-turn
conversations of LLaVA's lengths over a few thousand shared JPEGs (coco/..., gqa/... paths). Each
size is curated in its own process, which reports its peak RSS, so the sizes compare side by side:
memory must stay flat as the record count doubles (the stage streams records and never holds the list).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tasks.common import StagePaths
from tasks.curate import curate
from tasks.params import REPO, deep_merge, load_params


WORDS = ("the a man woman dog cat red blue large small table street car people sitting standing next to on in front of "
         "holding white black picture shows there is are two three several building sky tree window").split()


def write_llava_json(path: Path, image_root: Path, records: int, images: int, seed: int = 0) -> None:
    """A LLaVA-665k-shaped JSON list: ids, shared image paths, 1-8 human/gpt rounds of LLaVA's lengths."""
    from PIL import Image

    rng = random.Random(seed)
    names = [f"{('coco/train2017', 'gqa/images', 'vg/VG_100K')[i % 3]}/{i:012d}.jpg" for i in range(images)]
    for i, name in enumerate(names):
        (image_root / name).parent.mkdir(parents=True, exist_ok=True)
        side = rng.choice((336, 480, 640))
        Image.new("RGB", (side, side * 3 // 4), ((i * 7) % 256, (i * 13) % 256, (i * 29) % 256)).save(image_root / name, quality=80)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    with path.open("w", encoding="utf-8") as handle:
        handle.write("[\n")
        for i in range(records):
            turns = []
            for r in range(rng.randint(1, 8)):
                question = sentence(rng.randint(5, 15)) + "?"
                turns += [{"from": "human", "value": ("<image>\n" + question) if r == 0 else question},
                          {"from": "gpt", "value": " ".join(sentence(rng.randint(6, 20)) for _ in range(rng.randint(1, 4)))}]
            record = {"id": f"{i:09d}", "image": names[rng.randrange(images)], "conversations": turns}
            handle.write(("," if i else "") + json.dumps(record) + "\n")
        handle.write("]\n")


def curate_child(params_path: Path) -> None:
    """Curate one params file in this process and print what it took, peak RSS included."""
    params = load_params(params_path)
    started = time.perf_counter()
    metrics = curate(params, StagePaths(params, params_path.parent), show_progress=False)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"in": metrics["in"], "kept": metrics["kept"], "seconds": seconds, "peak_rss_mib": peak_mib}))


def llava_sizes(sizes: list[int], images: int) -> None:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            root = Path(tmp) / f"n{n}"
            (root / "images").mkdir(parents=True)
            started = time.perf_counter()
            write_llava_json(root / "llava_mix.json", root / "images", n, images)
            size_mb = (root / "llava_mix.json").stat().st_size / 1e6
            print(f"{n:,} records over {images:,} images: {size_mb:.0f} MB of JSON, written in {time.perf_counter() - started:.0f} s", flush=True)
            source = {"kind": "llava_json", "path": str(root / "llava_mix.json"), "image_root": str(root / "images"), "split": "multitask"}
            data = deep_merge(base, {"curate": {"sources": [source], "max_tokens": 4096, "max_image_side": 1024}})
            data["curate"]["sources"] = [source]
            (root / "params.yaml").write_text(yaml.safe_dump(data))
            out = subprocess.run([sys.executable, __file__, "--child", str(root / "params.yaml")], cwd=REPO, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((n, size_mb, result))
            print(f"  curated: kept {result['kept']:,} in {result['seconds']:.1f} s, {result['in'] / result['seconds']:,.0f} records/s, peak RSS {result['peak_rss_mib']:,.0f} MiB", flush=True)
    print("\n| records | JSON | records/s | peak RSS |\n|---:|---:|---:|---:|")
    for n, size_mb, r in rows:
        print(f"| {n:,} | {size_mb:.0f} MB | {r['in'] / r['seconds']:,.0f} | {r['peak_rss_mib']:,.0f} MiB |")
    if len(rows) > 1:
        print(f"peak RSS ratio, {rows[-1][0]:,} vs {rows[0][0]:,} records: {rows[-1][2]['peak_rss_mib'] / rows[0][2]['peak_rss_mib']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--llava", type=int, nargs="+", help="curate synthetic LLaVA-665k-shaped JSON lists of these sizes instead")
    parser.add_argument("--images", type=int, default=3000, help="distinct images the --llava records share")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return curate_child(args.child)
    if args.llava:
        return llava_sizes(args.llava, args.images)
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
