"""Shared fixtures: tiny params and tiny datasets, written under tmp_path."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.params import Params, load_params
from bench.workspace import make_workspace, write_params  # noqa: F401 - tests import write_params from here

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent

# The unit layer (`make test-fast`, `pytest -m fast`): no pipeline, no Prefect, no DeepSpeed job.
FAST_MODULES = {"test_losses", "test_params", "test_world", "test_curate", "test_upcycle", "test_tokenizer", "test_metrics"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in FAST_MODULES:
            item.add_marker(pytest.mark.fast)

# Outside the repo there is no shipped teacher: tiny projects train their tokenizer (and teacher) on the world,
# and their students start from a fresh LLM (the shipped one reads the shipped teacher's vocabulary).
TINY_WORLD = {
    "curate": {"world": {"images": {"general": 40, "multitask": 40, "preference": 20, "probes": 10, "lookup": 10}}, "tokenizer": {"source": "world"}},
    "teacher": {"source": "train"},
    "align": {"student": {"llm": "init", "sha256": None}},
}


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    return load_params(write_params(tmp_path, TINY_WORLD))


TINY_VISION = {"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2}
TINY_TEXT = {"family": "qwen2", "hidden_size": 32, "intermediate_size": 64, "layers": 4, "heads": 4, "kv_heads": 2}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few world sentences, with the chat template and <image>."""
    from model.tokenizer import train_tokenizer

    texts = ["A small red circle at the top left.", "Is there a star in the image?", "yes", "no", "two", "user", "assistant"]
    return train_tokenizer(texts * 20, vocab_size=300)


@pytest.fixture
def tiny_llava(tiny_tokenizer):
    """A randomly initialised 16-px LLaVA with a 4-layer Qwen2 text model (4 image tokens)."""
    from model.builders import build_llava
    from tasks.params import TextParams, VisionParams

    return build_llava(VisionParams(**TINY_VISION), TextParams(**TINY_TEXT), tiny_tokenizer, seed=0).eval()



def make_project(root: Path, overrides: dict | None = None) -> Path:
    """A copy of this repo's pipeline with ``preset: ci``."""
    return make_workspace(root, {"preset": "ci", **(overrides or {})})


@pytest.fixture(scope="session")
def prefect_server():
    """A throwaway Prefect API for the whole session (~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, prefect_server) -> tuple[Path, str | None]:
    """The CI preset run once end to end through the `distill-pipeline` flow (every stage a real DVC stage), and its error if it failed."""
    from flows.pipeline import distill_pipeline

    root = make_project(tmp_path_factory.mktemp("project"))
    state = distill_pipeline(workdir=str(root), return_state=True)
    # The stage's own error: StageFailed names the stage and ends with the tail of its log.
    return root, None if state.is_completed() else str(state.result(raise_on_failure=False))


_PIPELINE_FAILURE_SHOWN: list[str] = []


@pytest.fixture
def project(pipeline_run) -> Path:
    """The project the CI pipeline ran in. If it failed, the first test that needs it fails with the
    stage's error, once and without a traceback into Prefect; the others that need it are skipped."""
    root, error = pipeline_run
    if error is not None:
        if _PIPELINE_FAILURE_SHOWN:
            pytest.skip("the CI pipeline failed: its error is reported once, by the first end-to-end test")
        _PIPELINE_FAILURE_SHOWN.append(error)
        pytest.fail(f"the CI pipeline of the end-to-end tests failed: {error}", pytrace=False)
    return root


# ---------------------------------------------------------------- bad inputs (curate, fault injection)


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



# ---------------------------------------------------------------- S3 on loopback (moto's server mode)


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()



@pytest.fixture
def s3_env(monkeypatch, s3_endpoint):
    """Credentials and endpoint for boto3, DVC and MLflow, from the environment only."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "tinymod-test",
        "AWS_SECRET_ACCESS_KEY": "tinymod-secret-never-logged",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint



def bucket(name: str):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=name)
    return s3

