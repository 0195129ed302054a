"""Fault injection: every way tinymod was seen to lose data or fail unclearly, injected for real.

Each test injects one fault and asserts what must hold: nothing lost, one clear error, exact resume.

- a decompression-bomb image and oversized images: quarantined from the header, never decoded;
- corrupt images and too many rejections: the stage fails and the previous curated data stays;
- a crash at any record of curate: the previous outputs stay;
- a stale S3 object (same size, new content): downloaded again;
- a dead S3 endpoint: retried with backoff, then one error without credentials;
- a dead MLflow server: one line in seconds, before the work;
- MLflow lost after a training job: the previous checkpoint stays, the new weights wait beside it;
- ``kill -9`` of a stage with its ranks alive: no rank survives it, and a rerun resumes exactly;
- a bad value a preset masks: still reported, before any work.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model.s3 import S3Error, check_bucket, download_prefix
from tasks import mimic_dense
from tasks.common import read_jsonl
from tasks.curate import CurateError, curate
from tasks.params import ParamsError, load_params

from .conftest import bucket, conv, png, write_params
from .test_curate import run_curate
from .test_stages import copy_inputs


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


def test_a_replaced_object_of_the_same_size_is_downloaded_again(s3_env, tmp_path):
    s3 = bucket("stale")
    s3.put_object(Bucket="stale", Key="llava/model.safetensors", Body=b"weights-v1")
    s3.put_object(Bucket="stale", Key="llava/config.json", Body=b"{}")
    local = download_prefix("s3://stale/llava", tmp_path)
    config_mtime = (local / "config.json").stat().st_mtime_ns
    s3.put_object(Bucket="stale", Key="llava/model.safetensors", Body=b"weights-v2")  # same size, new content
    time.sleep(0.01)
    download_prefix("s3://stale/llava", tmp_path)
    assert (local / "model.safetensors").read_bytes() == b"weights-v2"
    assert (local / "config.json").stat().st_mtime_ns == config_mtime, "an unchanged object is not fetched again"
    assert not list(local.rglob("*.partial")) and sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]


def test_an_unreachable_endpoint_is_retried_then_fails_clearly(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-that-must-not-leak")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard port: nothing listens
    started = time.time()
    with pytest.raises(S3Error, match="unreachable after 3 attempts") as info:
        check_bucket("s3://bucket/prefix", attempts=3, backoff_s=0.2)
    assert time.time() - started >= 0.2 + 0.4, "backs off between attempts"
    assert "secret-that-must-not-leak" not in str(info.value), "credentials never appear in errors"


def test_a_dead_tracking_server_fails_fast_with_one_clear_line(tmp_path, monkeypatch, capsys):
    from tasks import evaluate

    from .conftest import write_params

    write_params(tmp_path, {"tracking": {"uri": "http://127.0.0.1:9"}})  # discard port: nothing listens
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate, "_check_inputs", lambda params, paths: None)
    started = time.time()
    assert evaluate.main(["--params", "params.yaml"]) == 1
    err = capsys.readouterr().err
    assert time.time() - started < 30, "fails in seconds, not after MLflow's minutes of retries"
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in err and "3 attempts" in err and "tracking.uri" in err
    assert "Traceback" not in err


def test_a_stage_that_fails_after_its_job_keeps_the_previous_checkpoint(project, tmp_path, capsys, monkeypatch):
    """The job trained and saved, then MLflow went away: models/student_dense must still be the last good one.

    The job's own weights, trained again from the same inputs, are bit-identical to the project's run.
    """
    from tasks import tracking

    root = copy_inputs(project, tmp_path / "lost", "data/curated", "data/teacher_cache", "models/teacher", "models/student_align", "models/student_dense")
    before = (root / "models/student_dense/model.safetensors").read_bytes()

    def tracking_lost(*args, **kwargs):
        raise tracking.TrackingError("tracking server http://127.0.0.1:5000 unreachable (test)")

    monkeypatch.setattr(tracking, "finish_run", tracking_lost)
    monkeypatch.chdir(root)
    assert mimic_dense.main(["--params", "params.yaml"]) == 1
    assert "unreachable" in capsys.readouterr().err
    assert (root / "models/student_dense/model.safetensors").read_bytes() == before
    rerun = load_file(root / "models/student_dense.staging/model.safetensors")  # the new weights wait beside it
    first = load_file(project / "models/student_dense/model.safetensors")
    assert rerun.keys() == first.keys() and all(torch.equal(rerun[k], first[k]) for k in first), "a rerun must reproduce the weights"


def ranks_running_in(root: Path) -> list[int]:
    import psutil

    alive = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if "model.engine" in (proc.info["cmdline"] or []) and proc.info["cwd"] == str(root) and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except psutil.Error:
            continue
    return alive


def test_sigkill_mid_stage_then_rerun_resumes_to_the_same_weights(project, tmp_path):
    """Kill the job with SIGKILL after a checkpoint, re-run the stage: the pipeline's uninterrupted weights."""
    root = copy_inputs(project, tmp_path / "resume", "data/curated", "data/teacher_cache", "models/teacher", "models/student_align")
    uninterrupted = load_file(project / "models/student_dense/model.safetensors")
    run = [sys.executable, "-m", "tasks.mimic_dense"]
    process = subprocess.Popen(run, cwd=root, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = root / ".cache/runs/mimic_dense/checkpoints/latest"
    deadline = time.time() + 240
    while not latest.exists():
        assert process.poll() is None, "the stage ended before it could be killed"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # The ranks run in sessions of their own: they must die with the stage, not race the re-run.
    deadline = time.time() + 10
    while alive := ranks_running_in(root):
        assert time.time() < deadline, f"rank workers outlived the killed stage: {alive}"
        time.sleep(0.2)
    assert not (root / "models/student_dense/model.safetensors").exists(), "killed before the end"
    assert not json.loads((root / ".cache/runs/mimic_dense/state.json").read_text()).get("finished")

    out = subprocess.run(run, cwd=root, check=True, capture_output=True, text=True)
    assert "resumed from the checkpoint at step" in out.stdout
    resumed = load_file(root / "models/student_dense/model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6), key
    assert json.loads((root / "metrics/mimic_dense.json").read_text())["resumed_at"] in (2, 4)


def test_a_bad_value_a_preset_masks_is_still_reported(tmp_path):
    # presets/ci.yaml sets mimic_dense.steps; the value underneath is still checked.
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, {"preset": "ci", "mimic_dense": {"steps": "many"}}))
    problem = next(p for p in info.value.problems if p.key == "mimic_dense.steps")
    assert "masked by presets/ci.yaml" in problem.message and problem.origin == "params.yaml"


def test_a_truncated_image_is_refused_even_where_pil_was_told_to_load_them(monkeypatch):
    """lmms-eval sets PIL's LOAD_TRUNCATED_IMAGES on import; curate must not inherit it."""
    from PIL import ImageFile

    from tasks.curate import Rejected, check_image
    from tasks.params import CurateParams

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(Rejected) as info:
        check_image(png((1, 2, 3))[:60], CurateParams())
    assert info.value.reason == "image_undecodable"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process-wide setting is left as it was
