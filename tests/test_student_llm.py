"""bench/student_llm.py: a student LLM pretrained on the world's text, which align takes, checks against its pin and word-aligns."""

from __future__ import annotations

import importlib.util
import random
import re
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from model import world as W
from model.builders import CheckpointError, build_student, text_config
from model.config import SHAPES_DRAWN, WorldParams
from model.tokenizer import IMAGE_TOKEN
from model.vision_pretrain import POSITIONS
from tasks.align import align
from tasks.common import StagePaths, weights_sha256
from tasks.params import REPO, ParamsError, TextParams, load_params

from .conftest import TINY_TEXT, write_params

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("student_llm", REPO / "bench" / "student_llm.py")
student_llm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(student_llm)


def test_the_scene_is_given_as_its_caption_where_the_image_would_be_and_every_answer_is_read_off_it(tiny_tokenizer):
    rng = random.Random(0)
    context = student_llm.SceneContext("caption", tiny_tokenizer, WorldParams())
    asked = 0
    for _ in range(200):
        messages, _ = student_llm.conversation(rng, WorldParams(), context)
        description, first_question = messages[0]["content"].split("\n")
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert "<image>" not in description and W.object_mentions(description, SHAPES_DRAWN)
        for question, answer in zip([first_question] + [m["content"] for m in messages[2::2]], [m["content"] for m in messages[1::2]], strict=True):
            colour = re.fullmatch(r"What colour is the (\w+)\?", question)
            if colour:  # "The star is red." where the description says "... red star ..."
                said = re.fullmatch(rf"The {colour[1]} is (\w+)\.", answer)[1]
                assert f"{said} {colour[1]}" in description, (description, question, answer)
                asked += 1
            if question == "Describe the image.":
                assert answer == description
    assert asked > 50


def test_a_pretrained_student_llm_goes_into_the_student_unchanged_and_is_word_aligned(tiny_llava, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(text_config(TextParams(**TINY_TEXT), tiny_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    context = student_llm.SceneContext("cells", tiny_tokenizer, WorldParams())
    losses = student_llm.pretrain(model, tiny_tokenizer, WorldParams(), context, steps=3, batch_size=4, lr=1e-2)
    assert len(losses) == 3 and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    folder = tmp_path / "student_llm"
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)

    student = build_student(tiny_llava, TextParams(**TINY_TEXT), str(folder), tiny_tokenizer, seed=0)
    assert torch.equal(student.model.language_model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    params = load_params(write_params(tmp_path, {"align": {"student": {"llm": str(folder), "text": TINY_TEXT}}}))  # the shape it has
    assert params.word_aligns, "a pretrained LLM's image tokens are new too: align word-aligns it on the world"


def test_in_the_cells_context_each_object_is_one_position_holding_the_mean_of_its_words(tiny_tokenizer):
    spec = WorldParams()
    context = student_llm.SceneContext("cells", tiny_tokenizer, spec)
    messages, objects = student_llm.conversation(random.Random(3), spec, context)
    assert messages[0]["content"].startswith(f"{IMAGE_TOKEN}\n") and all(IMAGE_TOKEN not in m["content"] for m in messages[1:])
    ids, labels = map(torch.tensor, student_llm.token_ids(tiny_tokenizer, messages))
    assert (labels[ids == context.image_id] == -100).all() and (labels[ids != context.image_id] == ids[ids != context.image_id]).all()
    ids = ids[None]
    assert int((ids == context.image_id).sum()) == student_llm.CELLS

    embeddings = torch.nn.Embedding(len(tiny_tokenizer), 16)
    embedded = context.embed(embeddings, ids, [objects])[0, ids[0] == context.image_id]  # [9, 16]

    def word(text: str) -> torch.Tensor:
        return embeddings.weight[tiny_tokenizer(" " + text, add_special_tokens=False).input_ids].mean(0)

    held = set()
    for obj in objects:
        cell = min(int(obj.y * 3), 2) * 3 + min(int(obj.x * 3), 2)
        expected = torch.stack([word(obj.shape), word(obj.colour), word(obj.size), word(POSITIONS[cell])]).mean(0)
        torch.testing.assert_close(embedded[cell], expected)
        held.add(cell)
    for cell in set(range(9)) - held:  # nothing there: the image token's own embedding
        torch.testing.assert_close(embedded[cell], embeddings.weight[context.image_id])


def test_align_refuses_a_student_llm_whose_weights_are_not_the_pinned_ones_before_any_work(tiny_tokenizer, tmp_path):
    folder = tmp_path / "llm"
    AutoModelForCausalLM.from_config(text_config(TextParams(**TINY_TEXT), tiny_tokenizer)).save_pretrained(folder, safe_serialization=True)
    assert weights_sha256(folder) != "0" * 64
    params = load_params(write_params(tmp_path, {"align": {"student": {"llm": str(folder), "sha256": "0" * 64, "text": TINY_TEXT}}}))
    with pytest.raises(CheckpointError, match=r"align.student.sha256 expects 0{64}.*students/README.md remakes"):
        align(params, StagePaths(params, tmp_path))  # no teacher, no data: the pin is checked before either is read


def test_a_pin_without_a_pretrained_llm_is_refused_before_any_work(tmp_path):
    with pytest.raises(ParamsError, match="align.student.sha256"):
        load_params(write_params(tmp_path, {"align": {"student": {"llm": "init", "sha256": "0" * 64}}}))


def test_widen_keeps_the_function_and_gives_the_new_neurons_gradients(tiny_tokenizer):
    torch.manual_seed(0)
    narrow = AutoModelForCausalLM.from_config(text_config(TextParams(**TINY_TEXT), tiny_tokenizer)).eval()
    wide = student_llm.widen(narrow, TINY_TEXT["intermediate_size"] + 32, seed=1).eval()
    assert wide.config.intermediate_size == TINY_TEXT["intermediate_size"] + 32
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    torch.testing.assert_close(wide(ids).logits, narrow(ids).logits)
    wide(ids).logits.square().mean().backward()
    new_columns = wide.model.layers[0].mlp.down_proj.weight.grad[:, TINY_TEXT["intermediate_size"] :]
    assert new_columns.abs().sum() > 0
