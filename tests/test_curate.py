"""Stage curate: each corruption lands in quarantine with its reason; every clean record is kept."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model import world as W
from tasks.common import StagePaths, read_jsonl
from tasks.curate import CurateError, curate, world_spec
from tasks.params import load_params

from .conftest import TINY_WORLD, write_params


def png(colour: tuple[int, int, int], side: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def conv(question: str, answer: str, image_tokens: int = 1) -> list[dict]:
    return [
        {"from": "human", "value": "<image>\n" * image_tokens + question},
        {"from": "gpt", "value": answer},
    ]


@pytest.fixture
def corrupt_sources(tmp_path: Path) -> dict:
    """Every input format, each with clean records and one record per kind of corruption."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(6):
        (root / f"good{i}.png").write_bytes(png((40 * i, 100, 200)))
    (root / "truncated.png").write_bytes(png((1, 2, 3))[:60])
    (root / "text.png").write_bytes(b"this is not an image")
    (root / "tiny.png").write_bytes(png((9, 9, 9), side=4))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png((5, 5, 5)))
    (root / "link.png").symlink_to(outside / "secret.png")

    expected: dict[str, str] = {}  # record id -> reason ("kept" / "duplicate")

    def rec(rid: str, image, conversations, outcome: str) -> dict:
        expected[rid] = outcome
        item = {"id": rid, "conversations": conversations}
        if image is not None:
            item["image"] = image
        return item

    lines = [
        json.dumps(rec("clean-0", "good0.png", conv("What colour?", "blue"), "kept")),
        json.dumps(rec("clean-1", "good1.png", conv("What colour?", "teal"), "kept")),
        json.dumps(rec("dup-of-0", "good0.png", conv("What colour?", "blue"), "duplicate")),
        json.dumps(rec("missing", "nope.png", conv("q", "a"), "image_missing")),
        json.dumps(rec("traversal", "../outside/secret.png", conv("q", "a"), "path_escape")),
        json.dumps(rec("absolute", str(outside / "secret.png"), conv("q", "a"), "path_escape")),
        json.dumps(rec("symlink", "link.png", conv("q", "a"), "path_escape")),
        json.dumps(rec("truncated", "truncated.png", conv("q", "a"), "image_undecodable")),
        json.dumps(rec("not-image", "text.png", conv("q", "a"), "image_undecodable")),
        json.dumps(rec("tiny", "tiny.png", conv("q", "a"), "image_size")),
        json.dumps(rec("roles", "good2.png", [{"from": "gpt", "value": "<image>\nhi"}, {"from": "human", "value": "a"}], "roles")),
        json.dumps(rec("empty", "good2.png", conv("q", "   "), "empty_answer")),
        json.dumps(rec("no-token", "good2.png", conv("q", "a", image_tokens=0), "image_token")),
        json.dumps(rec("two-tokens", "good2.png", conv("q", "a", image_tokens=2), "image_token")),
        json.dumps(rec("overlong", "good3.png", conv("q", "word " * 2000), "too_long")),
        json.dumps(rec("schema", "good2.png", "not a list", "schema")),
        json.dumps(rec("no-image", None, conv("q", "a", image_tokens=0), "no_image")),
        "{not json",
    ]
    expected["<bad json>"] = "bad_json"
    jsonl = tmp_path / "general.jsonl"
    body = "\n".join(lines).encode() + b'\n{"id": "bad-bytes", "image": "good4.png", "conversations": "\xff\xfe"}\n'
    expected["<bad bytes>"] = "bad_encoding"
    jsonl.write_bytes(body)

    multitask = tmp_path / "multitask.json"
    turns = conv("What colour?", "blue") + [{"from": "human", "value": "Where?"}, {"from": "gpt", "value": "left"}]
    multitask.write_text(
        json.dumps(
            [
                rec("multi-0", "good4.png", turns, "kept"),
                rec("multi-odd", "good4.png", turns[:3], "roles"),
            ]
        )
    )
    table = pa.table(
        {
            "id": ["pq-0", "pq-same"],
            "image": [{"bytes": png((1, 200, 1)), "path": None}, {"bytes": png((2, 200, 2)), "path": None}],
            "question": ["Is there a star?", "Is there a star?"],
            "chosen": ["no", "yes"],
            "rejected": ["yes", "yes"],
        }
    )
    expected.update({"pq-0": "kept", "pq-same": "same_pair"})
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(table, parquet)
    pref_jsonl = tmp_path / "pairs.jsonl"
    pref_jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "pj-0", "image": "good5.png", "question": "Describe.", "chosen": "a blue square", "rejected": "a star"},
                {"id": "pj-empty", "image": "good5.png", "question": "Describe.", "chosen": "", "rejected": "a star"},
            ]
        )
    )
    expected.update({"pj-0": "kept", "pj-empty": "empty_answer"})
    sources = [
        {"kind": "llava_json", "path": str(jsonl), "image_root": str(root), "split": "general"},
        {"kind": "llava_json", "path": str(multitask), "image_root": str(root), "split": "multitask"},
        {"kind": "preference", "path": str(parquet), "image_root": str(root)},
        {"kind": "preference", "path": str(pref_jsonl), "image_root": str(root)},
    ]
    return {"sources": sources, "expected": expected, "root": tmp_path}


def run_curate(root: Path, overrides: dict) -> tuple[dict, StagePaths]:
    params = load_params(write_params(root, overrides))
    paths = StagePaths(params, root)
    return curate(params, paths, show_progress=False), paths


def test_each_corruption_is_quarantined_with_its_reason(corrupt_sources):
    root = corrupt_sources["root"]
    overrides = {"curate": {"sources": corrupt_sources["sources"], "max_rejected_fraction": 1.0, "max_tokens": 256}}
    metrics, paths = run_curate(root / "run", overrides)
    quarantine = list(read_jsonl(paths.curated / "quarantine.jsonl"))
    by_id = {q["id"]: q["reason"] for q in quarantine if q["id"]}
    expected = corrupt_sources["expected"]
    for rid, outcome in expected.items():
        if outcome in ("kept", "duplicate") or rid.startswith("<"):
            continue
        assert by_id.get(rid) == outcome, f"{rid}: expected {outcome}, quarantine says {by_id.get(rid)}"
    reasons = Counter(q["reason"] for q in quarantine)
    assert reasons["bad_json"] == 1 and reasons["bad_encoding"] == 1
    kept = {r["id"] for split in ("general", "multitask", "preference") for r in read_jsonl(paths.curated / f"{split}.jsonl")}
    assert kept == {rid for rid, outcome in expected.items() if outcome == "kept"}
    assert metrics["in"] == metrics["kept"] + metrics["duplicates"] + metrics["rejected"]
    assert metrics["duplicates"] == 1
    assert metrics["rejected"] == len(quarantine) == sum(metrics["rejected_by_reason"].values())
    card = (paths.reports / "data_card.md").read_text()
    for reason in reasons:
        assert f"| {reason} |" in card


def test_kept_records_are_self_contained_llava_records(corrupt_sources):
    root = corrupt_sources["root"]
    overrides = {"curate": {"sources": corrupt_sources["sources"], "max_rejected_fraction": 1.0}}
    _, paths = run_curate(root / "run", overrides)
    for split in ("general", "multitask", "preference"):
        for record in read_jsonl(paths.curated / f"{split}.jsonl"):
            image = paths.curated / record["image"]
            assert image.is_file() and not image.is_symlink()
            Image.open(image).load()
            assert record["conversations"][0]["from"] == "human"
            assert record["conversations"][0]["value"].count("<image>") == 1
    preference = list(read_jsonl(paths.curated / "preference.jsonl"))
    assert {r["id"] for r in preference} == {"pq-0", "pj-0"}
    assert all(r["chosen"] and r["rejected"] for r in preference)


def test_too_many_rejections_fail_the_stage_and_keep_the_previous_outputs(corrupt_sources):
    root = corrupt_sources["root"]
    good = {"curate": {"sources": corrupt_sources["sources"], "max_rejected_fraction": 1.0}}
    _, paths = run_curate(root / "run", good)
    before = {f.relative_to(paths.curated): f.read_bytes() for f in paths.curated.rglob("*") if f.is_file()}
    metrics_before = (paths.metrics / "curate.json").read_text()
    params = load_params(write_params(root / "run", {"curate": {**good["curate"], "max_rejected_fraction": 0.05}}))
    with pytest.raises(CurateError, match=r"above curate.max_rejected_fraction.*curated.staging/quarantine.jsonl.*untouched"):
        curate(params, paths, show_progress=False)
    after = {f.relative_to(paths.curated): f.read_bytes() for f in paths.curated.rglob("*") if f.is_file()}
    assert after == before and (paths.metrics / "curate.json").read_text() == metrics_before
    # The failed attempt's quarantine is kept for inspection beside the untouched outputs.
    assert sum(1 for _ in read_jsonl(root / "run/data/curated.staging/quarantine.jsonl")) > 10


def test_a_crash_mid_stage_leaves_the_previous_outputs_intact(corrupt_sources, monkeypatch):
    from tasks import curate as stage

    root = corrupt_sources["root"]
    overrides = {"curate": {"sources": corrupt_sources["sources"], "max_rejected_fraction": 1.0}}
    _, paths = run_curate(root / "run", overrides)
    before = sorted(f.relative_to(paths.curated) for f in paths.curated.rglob("*"))
    calls = []

    def crash_on_the_fifth(data, params):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("killed mid-stage")
        return check_image(data, params)

    check_image = stage.check_image
    monkeypatch.setattr(stage, "check_image", crash_on_the_fifth)
    with pytest.raises(MemoryError):
        run_curate(root / "run", overrides)
    assert sorted(f.relative_to(paths.curated) for f in paths.curated.rglob("*")) == before
    assert (paths.tokenizer / "tokenizer.json").exists()


def test_bombs_and_oversized_images_are_quarantined_from_the_header(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "good.png").write_bytes(png((10, 200, 30)))
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, format="PNG")  # 400 Mpx: PIL's decompression-bomb error
    (root / "bomb.png").write_bytes(buffer.getvalue())
    buffer = io.BytesIO()
    Image.new("1", (6_000, 300)).save(buffer, format="PNG")  # over max_image_side, under PIL's bomb limit
    (root / "wide.png").write_bytes(buffer.getvalue())
    lines = [json.dumps({"id": name, "image": f"{name}.png", "conversations": conv("q", "a")}) for name in ("good", "bomb", "wide")]
    (tmp_path / "general.jsonl").write_text("\n".join(lines))
    sources = [{"kind": "llava_json", "path": str(tmp_path / "general.jsonl"), "image_root": str(root), "split": "general"}]
    decoded = []
    load = Image.Image.load

    def counting_load(image):
        decoded.append(image.size)
        return load(image)

    Image.Image.load = counting_load
    try:
        _, paths = run_curate(tmp_path / "run", {"curate": {"sources": sources, "max_rejected_fraction": 1.0}})
    finally:
        Image.Image.load = load
    quarantine = {q["id"]: q for q in read_jsonl(paths.curated / "quarantine.jsonl")}
    assert quarantine["bomb"]["reason"] == "image_size" and "decompression bomb" in quarantine["bomb"]["detail"]
    assert quarantine["wide"]["reason"] == "image_size" and "6000x300" in quarantine["wide"]["detail"]
    assert (6_000, 300) not in decoded and (20_000, 20_000) not in decoded
    assert [r["id"] for r in read_jsonl(paths.curated / "general.jsonl")] == ["good"]


def test_identical_runs_write_identical_quarantines(corrupt_sources):
    root = corrupt_sources["root"]
    overrides = {"curate": {"sources": corrupt_sources["sources"], "max_rejected_fraction": 1.0}}
    _, first = run_curate(root / "one", overrides)
    _, second = run_curate(root / "two", overrides)
    text = (first.curated / "quarantine.jsonl").read_text()
    assert " at 0x" not in text
    assert text == (second.curated / "quarantine.jsonl").read_text()


def test_world_curates_clean_with_probes_and_tokenizer(tmp_path):
    metrics, paths = run_curate(tmp_path, TINY_WORLD)
    assert metrics["rejected"] == 0 and metrics["kept"] == metrics["in"]
    for name in ("pope_random", "pope_popular", "pope_adversarial", "vqa", "caption"):
        assert sum(1 for _ in read_jsonl(paths.probes / f"{name}.jsonl")) > 0
    assert (paths.tokenizer / "tokenizer.json").exists()
    probe_images = {r["image"] for name in ("vqa", "caption") for r in read_jsonl(paths.probes / f"{name}.jsonl")}
    train_images = {r["image"] for s in ("general", "multitask", "preference") for r in read_jsonl(paths.split(s))}
    assert not probe_images & train_images


def test_a_training_record_on_a_probe_image_is_a_probe_leak(tmp_path):
    params = load_params(write_params(tmp_path / "first", TINY_WORLD))
    spec = world_spec(params.curate)
    w = params.curate.world
    world = W.generate_world(spec, w.images.model_dump(), w.seed, w.qa_per_image, w.pope_per_image)
    leaked = tmp_path / "leak"
    leaked.mkdir()
    W.render(world.images["images/probes-000000.png"], spec).save(leaked / "copy.png")
    source = tmp_path / "leak.jsonl"
    source.write_text(json.dumps({"id": "leak", "image": "copy.png", "conversations": conv("q", "a")}) + "\n")
    overrides = {
        **TINY_WORLD,
        "curate": {
            **TINY_WORLD["curate"],
            "sources": [{"kind": "world"}, {"kind": "llava_json", "path": str(source), "image_root": str(leaked), "split": "general"}],
        },
    }
    metrics, paths = run_curate(tmp_path / "run", overrides)
    assert metrics["rejected_by_reason"] == {"probe_leak": 1}
    (entry,) = list(read_jsonl(paths.curated / "quarantine.jsonl"))
    assert entry["id"] == "leak" and "probe" in entry["detail"]
