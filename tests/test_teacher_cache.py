"""The teacher cache: what it stores gives the live teacher's terms, and a cache of other inputs is refused."""

from __future__ import annotations

import dataclasses

import json

import numpy as np
import pytest

from model.builders import build_llava
from model.data import Collator
from model.data import DistillBatch
from model.engine import LiveTeacher
from model.teacher_cache import TeacherCache, bytes_per_token, write_cache
from tasks.params import TextParams, VisionParams

from .conftest import TINY_TEXT, TINY_VISION
from .test_engine import batch_with_labels, objective_of


class Records:
    """A batch as the cache writer and the engine read a dataset: records, their encodings, items."""

    def __init__(self, batch: dict):
        self.records, self.encoded, self.items = [], [], []
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            ids, labels = batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist()
            self.records.append({"id": f"record-{i}"})
            self.encoded.append((ids, labels))
            self.items.append({"input_ids": ids, "labels": labels, "pixel_values": batch["pixel_values"][i]})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@pytest.fixture
def cached(tiny_llava, tiny_tokenizer, tmp_path):
    teacher = build_llava(VisionParams(**TINY_VISION), TextParams(**TINY_TEXT), tiny_tokenizer, seed=5).eval()
    data = Records(batch_with_labels(tiny_llava, tiny_tokenizer))
    collate = Collator(tiny_tokenizer.pad_token_id)

    def write(top_k: int, name: str = "cache"):
        header = write_cache(teacher, data, collate, tmp_path / name, top_k, visual=True, relation=True, header={"teacher_sha256": "abc"}, batch_size=2)
        return TeacherCache(tmp_path / name), header

    return teacher, data, collate, write


def batch_from_cache(cache: TeacherCache, data: Records, collate, top_k: int) -> DistillBatch:
    rows = cache.locate(data.records, data.encoded, "test")
    batch = collate([data[i] for i in range(len(data))])
    batch.teacher_response = cache.response_rows(rows, top_k)
    batch.teacher_visual = cache.visual_rows(rows, top_k)
    batch.teacher_relation = cache.relation(rows)
    return batch


def test_the_whole_vocabulary_cached_gives_the_live_teachers_terms(tiny_llava, cached):
    teacher, data, collate, write = cached
    vocab = tiny_llava.config.text_config.vocab_size
    cache, header = write(top_k=vocab)
    assert header["records"] == len(data) == 2 and header["response_rows"] == sum(sum(1 for x in labels[1:] if x != -100) for _, labels in data.encoded)
    weights = {"ce": 1.0, "kl_response": 1.0, "kl_visual": 1.0, "relation": 1.0}
    batch = batch_from_cache(cache, data, collate, vocab)
    live = objective_of(tiny_llava, LiveTeacher(teacher), chunk_size=3, **weights)(dataclasses.replace(batch, teacher_response=None, teacher_visual=None, teacher_relation=None))
    read = objective_of(tiny_llava, None, chunk_size=3, **weights)(batch)
    for term in ("ce", "kl_response", "kl_visual", "relation"):
        # float16 log-probs and relation matrices: a few parts in ten thousand
        assert read[term].item() == pytest.approx(live[term].item(), rel=2e-3, abs=1e-5), term
    # A smaller k is a coarser divergence: never above the exact one.
    small = batch_from_cache(cache, data, collate, 8)
    coarse = objective_of(tiny_llava, None, chunk_size=3, **weights)(small)
    assert 0 < coarse["kl_response"].item() <= live["kl_response"].item() + 1e-4


def test_a_cache_of_other_inputs_or_records_is_refused_by_name(tiny_llava, cached):
    _, data, _, write = cached
    cache, header = write(top_k=16)
    assert header["bytes_per_token"] == bytes_per_token(16, tiny_llava.config.text_config.vocab_size) == 16 * 4 + 2
    assert np.load(cache.path / "response_ids.npy", mmap_mode="r").dtype == np.uint16
    cache.check({"teacher_sha256": "abc"})
    with pytest.raises(ValueError, match=r"teacher_sha256 is abc, this stage's is def.*dvc repro teacher_cache"):
        cache.check({"teacher_sha256": "def"})
    with pytest.raises(ValueError, match=r"data\['general.jsonl'\]"):
        cache.check({"data": {"general.jsonl": "123"}})
    with pytest.raises(ValueError, match="'record-9' is not in the teacher cache"):
        cache.locate([{"id": "record-9"}], data.encoded[:1], "mimic_dense")
    ids, labels = data.encoded[0]
    with pytest.raises(ValueError, match="'record-0' has .* response tokens"):
        cache.locate(data.records[:1], [(ids, [-100] * len(labels))], "mimic_dense")
    (cache.path / "header.json").write_text(json.dumps({**header, "format": 0}))
    with pytest.raises(ValueError, match="cache format 0"):
        TeacherCache(cache.path)


def test_the_pipeline_caches_the_teacher_once_for_both_mimic_stages(project):
    metrics = json.loads((project / "metrics/teacher_cache.json").read_text())
    assert metrics["stages"] == ["mimic_dense", "mimic_sparse"] and metrics["records"] > 0 and metrics["response_rows"] > 0
    header = TeacherCache(project / "data/teacher_cache").header
    for stage in ("mimic_dense", "mimic_sparse"):
        spec = json.loads((project / ".cache/runs" / stage / "job.json").read_text())
        assert spec["teacher_cache"]["expect"]["teacher_sha256"] == header["teacher_sha256"], stage
    assert json.loads((project / ".cache/runs/baseline/job.json").read_text())["teacher_cache"] is None, "ce only: nothing to read"


def test_a_stale_cache_fails_the_stage_before_its_job_naming_what_differs(project, tmp_path, capsys, monkeypatch):
    from tasks import mimic_dense

    from .test_stages import copy_inputs

    root = copy_inputs(project, tmp_path / "stale", "data/curated", "data/teacher_cache", "models/teacher", "models/student_align")
    header = root / "data/teacher_cache/header.json"
    header.write_text(json.dumps({**json.loads(header.read_text()), "teacher_sha256": "0" * 64}))
    monkeypatch.chdir(root)
    assert mimic_dense.main(["--params", "params.yaml"]) == 1
    err = capsys.readouterr().err
    assert "teacher_sha256 is 0000000000000000..." in err and "dvc repro teacher_cache" in err
    assert not (root / ".cache/runs/mimic_dense/job.json").exists(), "the job never started"


def test_a_truncated_cache_file_fails_clearly_never_a_partial_read(cached):
    _, _, _, write = cached
    cache, _ = write(top_k=16)
    path = cache.path / "response_logprobs.npy"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"response_logprobs.npy: unreadable teacher cache file"):
        TeacherCache(cache.path)
    cache, _ = write(top_k=16, name="again")
    (cache.path / "offsets.npy").unlink()
    with pytest.raises(ValueError, match="offsets.npy"):
        TeacherCache(cache.path)


def test_a_cache_killed_before_its_header_was_written_is_not_a_cache(cached):
    """The header is written last: a stage killed mid-write leaves a folder no training stage accepts."""
    _, _, _, write = cached
    cache, _ = write(top_k=16)
    (cache.path / "header.json").unlink()
    with pytest.raises(ValueError, match=r"no teacher cache here \(header.json missing\); run `dvc repro teacher_cache`"):
        TeacherCache(cache.path)
