"""Sparse upcycling is exact, loads with plain transformers, and the balance loss is not lost."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2MoeForCausalLM

from model.builders import build_llava
from model.losses import load_balancing_loss
from model.upcycle import RouterLogits, UpcycleError, moe_layers, parameter_counts, routers, upcycle
from tasks.params import TextParams, UpcycleParams, VisionParams

from .conftest import TINY_TEXT, TINY_VISION


def inputs(model, tokenizer, batch: int = 3, seed: int = 0) -> dict:
    """Random images and text with one expanded <image> run per sample, the last sample right-padded."""
    g = torch.Generator().manual_seed(seed)
    n_image = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    image_id = model.config.image_token_index
    text = torch.randint(10, len(tokenizer) - 10, (batch, 12), generator=g)
    ids = torch.cat([text[:, :2], torch.full((batch, n_image), image_id), text[:, 2:]], dim=1)
    mask = torch.ones_like(ids)
    mask[-1, -4:] = 0
    side = model.config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(batch, 3, side, side, generator=g)}


@pytest.mark.parametrize("layers", ["every_other", "every_other_from_1", "first_half", "second_half", "all", [0, 3]])
@pytest.mark.parametrize("router_init", ["normal", "zeros"])
def test_upcycled_logits_equal_dense(tiny_llava, tiny_tokenizer, layers, router_init):
    params = UpcycleParams(num_experts=4, top_k=2, layers=layers, router_init=router_init, router_std=0.5)
    moe = upcycle(tiny_llava, params, seed=1).eval()
    batch = inputs(tiny_llava, tiny_tokenizer)
    with torch.no_grad():
        dense_logits = tiny_llava(**batch).logits
        moe_logits = moe(**batch).logits
    assert torch.allclose(moe_logits, dense_logits, atol=1e-5), (moe_logits - dense_logits).abs().max()
    expected = moe_layers(layers, TINY_TEXT["layers"])
    assert len(routers(moe)) == len(expected)
    assert moe.config.text_config.mlp_only_layers == [i for i in range(4) if i not in expected]


def test_one_expert_is_a_dense_ffn_in_moe_form(tiny_llava, tiny_tokenizer):
    """num_experts 1, top_k 1: the dense baseline that goes through the same stages as the MoE student."""
    moe = upcycle(tiny_llava, UpcycleParams(num_experts=1, top_k=1, layers="all")).eval()
    batch = inputs(tiny_llava, tiny_tokenizer)
    with torch.no_grad():
        assert torch.allclose(moe(**batch).logits, tiny_llava(**batch).logits, atol=1e-5)
    counts = parameter_counts(moe)
    assert counts["active"] == counts["total"]


def test_shared_expert_and_qwen3_are_exact_too(tiny_tokenizer):
    for family, shared in (("qwen2", True), ("qwen3", False)):
        dense = build_llava(VisionParams(**TINY_VISION), TextParams(**{**TINY_TEXT, "family": family}), tiny_tokenizer, 0).eval()
        moe = upcycle(dense, UpcycleParams(num_experts=3, top_k=1, layers="all", shared_expert=shared, router_std=0.3)).eval()
        batch = inputs(dense, tiny_tokenizer, seed=2)
        with torch.no_grad():
            assert torch.allclose(moe(**batch).logits, dense(**batch).logits, atol=1e-5)
        assert moe.config.text_config.model_type == f"{family}_moe"


def test_training_breaks_the_symmetry(tiny_llava, tiny_tokenizer):
    """Upcycled experts start equal; a gradient step through a noisy router makes them differ."""
    moe = upcycle(tiny_llava, UpcycleParams(num_experts=4, top_k=2, layers="all", router_std=0.5))
    batch = inputs(tiny_llava, tiny_tokenizer)
    moe(**batch).logits.float().pow(2).mean().backward()
    grad = moe.model.language_model.layers[0].mlp.experts.gate_up_proj.grad
    assert not torch.allclose(grad[0], grad[1])


def test_checkpoint_loads_with_plain_transformers_and_generates(tiny_llava, tiny_tokenizer, tmp_path):
    moe = upcycle(tiny_llava, UpcycleParams(num_experts=4, top_k=2)).eval()
    moe.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, use_safetensors=True).eval()
    batch = inputs(tiny_llava, tiny_tokenizer)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, moe(**batch).logits, atol=1e-6)
        out = loaded.generate(**{k: v[:1] for k, v in batch.items()}, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_balance_loss_from_hooks_equals_the_text_models_aux_loss(tiny_llava, tiny_tokenizer):
    moe = upcycle(tiny_llava, UpcycleParams(num_experts=4, top_k=2, layers="every_other", router_std=1.0)).eval()
    text_config = moe.config.text_config
    text_config.output_router_logits = True
    causal = Qwen2MoeForCausalLM(text_config).eval()
    causal.model.load_state_dict(moe.model.language_model.state_dict())
    ids = torch.randint(10, len(tiny_tokenizer), (3, 9))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with torch.no_grad(), RouterLogits(moe) as captured:
        moe(input_ids=ids, attention_mask=mask)
        expected = causal(input_ids=ids, attention_mask=mask).aux_loss
    ours = load_balancing_loss(captured.logits, top_k=2, token_mask=mask)
    assert len(captured.logits) == 2
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)


def test_parameter_counts(tiny_llava):
    dense = parameter_counts(tiny_llava)
    assert dense["active"] == dense["total"]
    moe = upcycle(tiny_llava, UpcycleParams(num_experts=4, top_k=2, layers="all"))
    counts = parameter_counts(moe)
    ffn = 3 * TINY_TEXT["hidden_size"] * TINY_TEXT["intermediate_size"]
    routers_ = 4 * TINY_TEXT["hidden_size"] + TINY_TEXT["hidden_size"]  # router + the silent shared-expert gate
    assert counts["total"] == dense["total"] + 4 * (3 * ffn + routers_)
    assert counts["active"] == dense["total"] + 4 * (ffn + routers_)


def test_bad_requests_name_the_problem(tiny_llava, tiny_tokenizer):
    with pytest.raises(UpcycleError, match="out of range"):
        upcycle(tiny_llava, UpcycleParams(layers=[7]))
    qwen3 = build_llava(VisionParams(**TINY_VISION), TextParams(**{**TINY_TEXT, "family": "qwen3"}), tiny_tokenizer, 0)
    with pytest.raises(UpcycleError, match="shared expert"):
        upcycle(qwen3, UpcycleParams(shared_expert=True))


def test_every_other_is_llava_mods_sparse_layout():
    """LLaVA-MoD (after MoE-LLaVA's moe_mode sparse) makes layers range(L)[::2] sparse: 0, 2, 4, ..."""
    assert moe_layers("every_other", 6) == [0, 2, 4] == list(range(6))[::2]
    assert moe_layers("every_other", 2) == [0]
    assert moe_layers("every_other_from_1", 6) == [1, 3, 5]


REAL_LLMS = {
    # Tiny widths, the families' own config choices: Qwen2 untied, Qwen2.5-0.5B tied with rope_theta 1e6, Qwen3 with head_dim and q/k norms.
    "qwen2": ("qwen2", {"tie_word_embeddings": False}),
    "qwen2.5": ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1_000_000.0, "max_position_embeddings": 32768}),
    "qwen3": ("qwen3", {"tie_word_embeddings": True, "head_dim": 16}),
}


@pytest.mark.parametrize("name", list(REAL_LLMS))
def test_a_student_from_a_local_causal_lm_upcycles_to_a_stock_moe_checkpoint(name, tiny_llava, tiny_tokenizer, tmp_path):
    """align.student.llm: /path: the student's LLM is that model's weights, padded vocabulary and all."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from model.builders import build_student

    family, extra = REAL_LLMS[name]
    config = AutoConfig.for_model(
        family, vocab_size=len(tiny_tokenizer) + 16, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, **extra,
    )  # fmt: skip
    torch.manual_seed(1)
    causal = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / name
    causal.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)

    student = build_student(tiny_llava, TextParams(**TINY_TEXT), str(folder), tiny_tokenizer, seed=0).eval()
    assert student.config.text_config.model_type == family and student.config.text_config.vocab_size == len(tiny_tokenizer) + 16
    assert torch.equal(student.lm_head.weight, causal.lm_head.weight)
    assert torch.equal(student.model.language_model.layers[2].mlp.up_proj.weight, causal.model.layers[2].mlp.up_proj.weight)
    text = torch.randint(10, len(tiny_tokenizer) - 10, (2, 9))
    with torch.no_grad():  # without an image, the student's LLM is that causal LM
        assert torch.allclose(student(input_ids=text).logits, causal(input_ids=text).logits, atol=1e-5)

    moe = upcycle(student, UpcycleParams(num_experts=4, top_k=2)).eval()
    moe.save_pretrained(tmp_path / "moe", safe_serialization=True)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "moe", use_safetensors=True).eval()
    assert loaded.config.text_config.model_type == f"{family}_moe"
    batch = inputs(student, tiny_tokenizer)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, student(**batch).logits, atol=1e-5), "upcycling is exact"
        out = loaded.generate(**{k: v[:1] for k, v in batch.items()}, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
