"""Stage curate: each corruption lands in quarantine with its reason; every clean record is kept."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from PIL import Image

from model import world as W
from tasks.common import StagePaths, read_jsonl
from tasks.curate import curate
from tasks.params import load_params

from .conftest import TINY_WORLD, conv, write_params


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


def test_the_lookup_split_is_curated_and_leaves_the_tokenizer_as_it_was(tmp_path):
    """The teacher's second phase adds a split; the tokenizer, and with it the first phase, must not move."""
    images = TINY_WORLD["curate"]["world"]["images"]
    metrics, paths = run_curate(tmp_path / "with", TINY_WORLD)
    assert metrics["splits"]["lookup"]["kept"] == sum(1 for _ in read_jsonl(paths.split("lookup"))) > 2 * images["lookup"]
    without = {**TINY_WORLD, "curate": {**TINY_WORLD["curate"], "world": {"images": {**images, "lookup": 0}}}}
    _, other = run_curate(tmp_path / "without", without)
    assert (paths.tokenizer / "tokenizer.json").read_bytes() == (other.tokenizer / "tokenizer.json").read_bytes()
    assert paths.split("multitask").read_bytes() == other.split("multitask").read_bytes()


def test_a_training_record_on_a_probe_image_is_a_probe_leak(tmp_path):
    params = load_params(write_params(tmp_path / "first", TINY_WORLD))
    spec = params.curate.world
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


def test_a_json_list_is_streamed_item_by_item_across_chunk_boundaries(tmp_path):
    import pytest

    from tasks.curate import CurateError, json_list_items

    items = [{"id": i, "text": "ü" * (i % 5), "n": 12345678 + i} for i in range(50)] + [7, "a string", [1, 2], None, 3.25]
    path = tmp_path / "list.json"
    path.write_text(" \n" + json.dumps(items, indent=1, ensure_ascii=False) + "\n")
    for chunk in (1, 3, 7, 64, 1 << 20):  # items, numbers and blanks cut at every place
        assert list(json_list_items(path, chunk_chars=chunk)) == items
    stream = json_list_items(path, chunk_chars=16)
    assert next(stream) == items[0]  # the first item comes before the file is read on
    (tmp_path / "empty.json").write_text("[ ]")
    assert list(json_list_items(tmp_path / "empty.json")) == []
    for text, message in (('{"id": 1}', "does not start with"), ('[{"id": 1} {"id": 2}]', "after item 0"), ('[{"id": 1}, {"id": ', "in item 1"), ('[{"id": 1}', "after item 0")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(CurateError, match=message):
            list(json_list_items(tmp_path / "bad.json", chunk_chars=4))


def test_records_sharing_an_image_decode_it_once_and_store_it_once(tmp_path, monkeypatch):
    import tasks.curate as C

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "shared.png")
    records = [{"id": str(i), "image": "shared.png", "conversations": conv(f"What is shape {i}?", "red")} for i in range(30)]
    (tmp_path / "mix.json").write_text(json.dumps(records))
    decoded = []
    check_image = C.check_image
    monkeypatch.setattr(C, "check_image", lambda data, cp: decoded.append(1) or check_image(data, cp))
    source = {"kind": "llava_json", "path": str(tmp_path / "mix.json"), "image_root": str(images), "split": "multitask"}
    metrics, paths = run_curate(tmp_path, {"curate": {"sources": [source], "tokenizer": {"source": "world"}}})
    assert (metrics["in"], metrics["kept"]) == (30, 30) and len(decoded) == 1
    assert len(list((paths.curated / "images").rglob("*.png"))) == 1
    assert [r["id"] for r in read_jsonl(paths.curated / "multitask.jsonl")] == [str(i) for i in range(30)]
