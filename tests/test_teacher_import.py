"""A real teacher is imported only after it is validated; nothing pickled, no remote code, one vocabulary."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bench.workspace import write_params
from model import world as W
from model.builders import CheckpointError, build_processor, validate_checkpoint
from model.tokenizer import save_tokenizer, train_tokenizer
from tasks import teacher as teacher_stage
from tasks.common import StagePaths
from tasks.params import load_params


@pytest.fixture
def checkpoint(tiny_llava, tiny_tokenizer, tmp_path):
    folder = tmp_path / "llava-hf"
    tiny_llava.save_pretrained(folder, safe_serialization=True)
    build_processor(tiny_tokenizer, tiny_llava.config.vision_config).save_pretrained(folder)
    return folder


def test_a_valid_checkpoint_imports_and_loads(checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    root = tmp_path / "project"
    write_params(root, {"teacher": {"source": str(checkpoint), "sha256": None}})
    save_tokenizer(tiny_tokenizer, root / "models/tokenizer")
    monkeypatch.chdir(root)
    assert teacher_stage.main(["--params", "params.yaml"]) == 0
    metrics = json.loads((root / "metrics/teacher.json").read_text())
    assert metrics["source"] == str(checkpoint) and metrics["total_parameters"] > 0
    assert (root / "models/teacher/model.safetensors").exists()
    paths = StagePaths(load_params(root / "params.yaml"), root)
    assert paths.teacher == root / "models/teacher"


def test_pickled_weights_are_refused_not_loaded(tiny_llava, tiny_tokenizer, tmp_path):
    folder = tmp_path / "pickled"
    tiny_llava.save_pretrained(folder, safe_serialization=False)
    build_processor(tiny_tokenizer, tiny_llava.config.vision_config).save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    if not list(folder.glob("*.bin")):  # transformers 5 may refuse to write pickles: make one
        torch.save(tiny_llava.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        validate_checkpoint(folder)


def test_remote_code_and_wrong_architecture_are_refused(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.Model"}
    config["model_type"] = "qwen2"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(checkpoint)
    assert "remote code" in str(info.value) and "model_type is 'qwen2'" in str(info.value)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "processor_config.json"])
def test_remote_code_asked_by_any_config_is_refused(checkpoint, name):
    file = checkpoint / name
    data = json.loads(file.read_text()) if file.exists() else {}
    file.write_text(json.dumps({**data, "auto_map": {"AutoTokenizer": ["evil.Tokenizer", None]}}))
    (checkpoint / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(CheckpointError, match=rf"{name} asks for remote code"):
        validate_checkpoint(checkpoint)


def test_a_different_tokenizer_is_refused_naming_the_first_differing_tokens(checkpoint, tiny_tokenizer):
    other = train_tokenizer(["completely different words here"] * 30, vocab_size=310)
    with pytest.raises(CheckpointError, match=r"student tokenizer \(models/tokenizer, \d+ tokens\) and teacher .* \(\d+ tokens\) differ at \d+ ids, first id \d+: '.*' vs '.*'"):
        validate_checkpoint(checkpoint, student_tokenizer=other)
    # One token renamed, same size: still a different tokenizer, and the message points at it.
    vocab = tiny_tokenizer.get_vocab()
    renamed = {("zzz" if i == 40 else t): i for t, i in vocab.items()}
    token = next(t for t, i in vocab.items() if i == 40)

    class Renamed:
        def get_vocab(self):
            return renamed

        def __len__(self):
            return len(renamed)

    with pytest.raises(CheckpointError, match=re.escape(f"differ at 1 ids, first id 40: 'zzz' vs {token!r}")):
        validate_checkpoint(checkpoint, student_tokenizer=Renamed())


def test_a_teacher_whose_embeddings_are_padded_past_the_tokenizer_is_accepted(tiny_llava, tiny_tokenizer, tmp_path):
    """Qwen2-7B pads its embeddings to 152,064 rows and 0.5B to 151,936, for one tokenizer: the same vocabulary."""
    tiny_llava.resize_token_embeddings(len(tiny_tokenizer) + 24)
    folder = tmp_path / "padded"
    tiny_llava.save_pretrained(folder, safe_serialization=True)
    build_processor(tiny_tokenizer, tiny_llava.config.vision_config).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"] == len(tiny_tokenizer) + 24
    validate_checkpoint(folder, student_tokenizer=tiny_tokenizer)


def test_a_pinned_hash_refuses_changed_weights(checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    root = tmp_path / "project"
    pinned = teacher_stage.weights_sha256(checkpoint)
    write_params(root, {"teacher": {"source": str(checkpoint), "sha256": pinned}})
    save_tokenizer(tiny_tokenizer, root / "models/tokenizer")
    monkeypatch.chdir(root)
    assert teacher_stage.main(["--params", "params.yaml"]) == 0
    assert json.loads((root / "metrics/teacher.json").read_text())["sha256"] == pinned

    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: same size, same header
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="teacher.sha256 expects " + pinned + r".*or null"):
        teacher_stage.teacher(load_params(root / "params.yaml"), StagePaths(load_params(root / "params.yaml"), root))


def test_a_teacher_trained_on_another_world_is_refused(checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    root = tmp_path / "project"
    write_params(root, {"teacher": {"source": str(checkpoint), "sha256": None}})
    params = load_params(root / "params.yaml")
    shipped = teacher_stage.trained_on(params)
    shipped["curate.world"]["hallucination_rate"] = 0.1
    (checkpoint / teacher_stage.TRAINED_ON).write_text(json.dumps(shipped))
    save_tokenizer(tiny_tokenizer, root / "models/tokenizer")
    monkeypatch.chdir(root)
    with pytest.raises(CheckpointError, match=r"curate.world.hallucination_rate differ.*teacher.source: train"):
        teacher_stage.teacher(params, StagePaths(params, root))
    assert not (root / "models/teacher").exists(), "a refused teacher must not be copied in"


def test_a_teacher_trained_on_records_the_world_code_no_longer_writes_is_refused(checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    root = tmp_path / "project"
    write_params(root, {"teacher": {"source": str(checkpoint), "sha256": None}})
    params = load_params(root / "params.yaml")
    shipped = teacher_stage.trained_on(params)
    (checkpoint / teacher_stage.TRAINED_ON).write_text(json.dumps(shipped))
    save_tokenizer(tiny_tokenizer, root / "models/tokenizer")
    monkeypatch.chdir(root)
    teacher_stage.check_world(params, checkpoint)  # the same code and world: accepted
    # One more word in every caption, the kind of change curate.world cannot show.
    caption = W.caption
    monkeypatch.setattr(W, "caption", lambda objects: "Look: " + caption(objects))
    with pytest.raises(CheckpointError, match=r"records model/world.py no longer writes.*restore model/world.py"):
        teacher_stage.teacher(params, StagePaths(params, root))
    assert not (root / "models/teacher").exists(), "a refused teacher must not be copied in"
