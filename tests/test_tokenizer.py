"""The world tokenizer is a plain HF tokenizer with a chat template and an <image> token."""

from __future__ import annotations

from transformers import AutoTokenizer

from model.tokenizer import IMAGE_TOKEN, train_tokenizer

TEXTS = ["user", "assistant", "What colour is the star?", "red", "A small red star at the top left."] * 20


def test_round_trip_through_save_pretrained(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.image_token == IMAGE_TOKEN
    assert loaded.convert_tokens_to_ids(IMAGE_TOKEN) == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = "A small red star at the top left."
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.pad_token and loaded.eos_token == "<|im_end|>"


def test_chat_template_is_chatml_with_the_image_placeholder(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]},
        {"role": "assistant", "content": "red"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\n<image>\nWhat colour is the star?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
