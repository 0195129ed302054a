"""bench/student_llm.py: a student LLM pretrained on the world's text, which align takes and word-aligns."""

from __future__ import annotations

import importlib.util
import random
import re
import sys

import torch
from transformers import AutoModelForCausalLM

from model import world as W
from model.builders import build_student, text_config
from model.config import SHAPES_DRAWN, WorldParams
from tasks.params import REPO, TextParams, load_params

from .conftest import TINY_TEXT, write_params

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("student_llm", REPO / "bench" / "student_llm.py")
student_llm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(student_llm)


def test_the_scene_is_given_as_its_caption_where_the_image_would_be_and_every_answer_is_read_off_it():
    rng = random.Random(0)
    asked = 0
    for _ in range(200):
        messages = student_llm.conversation(rng, WorldParams())
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
    losses = student_llm.pretrain(model, tiny_tokenizer, WorldParams(), steps=3, batch_size=4, lr=1e-2)
    assert len(losses) == 3 and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    folder = tmp_path / "student_llm"
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)

    student = build_student(tiny_llava, TextParams(**TINY_TEXT), str(folder), tiny_tokenizer, seed=0)
    assert torch.equal(student.model.language_model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    params = load_params(write_params(tmp_path, {"align": {"student": {"llm": str(folder)}}}))
    assert params.word_aligns, "a pretrained LLM's image tokens are new too: align word-aligns it on the world"
