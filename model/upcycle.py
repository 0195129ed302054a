"""Sparse upcycling: a dense LLaVA student becomes a Mixture-of-Experts one, exactly.

The dense student's text model (Qwen2 / Qwen3) is rebuilt as the stock
transformers MoE architecture of its family (Qwen2-MoE / Qwen3-MoE). In every
chosen layer each of the ``E`` experts is a copy of the dense FFN; the router
picks ``top_k`` of them and renormalises their probabilities to sum to one, so
at upcycling time the MoE model computes exactly what the dense one did
(Komatsuzaki et al. 2022, "Sparse Upcycling"; LLaVA-MoD section 3.1). Layers
not chosen keep their dense FFN (``mlp_only_layers``).

Weights are copied the nanoGPT way: every target key is accounted for, every
source key consumed, and every shape asserted before ``copy_()``.
"""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from model.config import UpcycleParams
from model.errors import TinymodError

MOE_OF = {"qwen2": ("qwen2_moe", Qwen2MoeConfig), "qwen3": ("qwen3_moe", Qwen3MoeConfig)}
ROUTER_TYPES = (Qwen2MoeTopKRouter, Qwen3MoeTopKRouter)
# Fields the MoE config takes over from the dense one (those the dense config has).
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types", "attention_dropout", "attention_bias", "pad_token_id",
    "bos_token_id", "eos_token_id",
)  # fmt: skip


class UpcycleError(TinymodError, ValueError):
    """The dense model cannot be upcycled as asked; the message says why."""


def moe_layers(layers: str | list[int], num_layers: int) -> list[int]:
    """Decoder layer indices that become MoE.

    ``every_other`` is layers 0, 2, 4, ...: LLaVA-MoD's sparse layout, ``range(L)[::2]`` (its
    ``moe_mode: sparse``, from MoE-LLaVA). ``every_other_from_1`` is 1, 3, 5, ..., the same density
    with the first layer kept dense. ``first_half`` / ``second_half`` split at ``num_layers // 2``.
    """
    if isinstance(layers, list):
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise UpcycleError(f"upcycle.layers: {bad} out of range; the student has {num_layers} layers (0..{num_layers - 1})")
        if not layers:
            raise UpcycleError("upcycle.layers: empty list; name at least one layer")
        return sorted(set(layers))
    chosen = {
        "every_other": list(range(0, num_layers, 2)),
        "every_other_from_1": list(range(1, num_layers, 2)),
        "first_half": list(range(0, max(1, num_layers // 2))),
        "second_half": list(range(num_layers // 2, num_layers)),
        "all": list(range(num_layers)),
    }[layers]
    if not chosen:
        raise UpcycleError(f"upcycle.layers: {layers!r} picks no layer of a {num_layers}-layer student")
    return chosen


def moe_text_config(dense, params: UpcycleParams):
    """The stock MoE config of the dense config's family, with the experts of ``params``."""
    family = dense.model_type
    if family not in MOE_OF:
        raise UpcycleError(f"cannot upcycle a {family!r} text model; supported: {', '.join(MOE_OF)}")
    moe_type, config_class = MOE_OF[family]
    if params.shared_expert and moe_type != "qwen2_moe":
        raise UpcycleError("upcycle.shared_expert: Qwen3-MoE has no shared expert; use a qwen2 student")
    chosen = moe_layers(params.layers, dense.num_hidden_layers)
    kwargs = {name: getattr(dense, name) for name in SHARED_FIELDS if hasattr(dense, name)}
    kwargs.update(
        num_experts=params.num_experts,
        num_experts_per_tok=params.top_k,
        moe_intermediate_size=dense.intermediate_size,
        norm_topk_prob=True,  # renormalised top-k weights sum to 1: the exactness of upcycling
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(dense.num_hidden_layers) if i not in chosen],
        output_router_logits=False,
        router_aux_loss_coef=0.0,  # tinymod adds the balance loss itself, weighted by the stage
    )
    if moe_type == "qwen2_moe":
        kwargs["qkv_bias"] = True  # Qwen2 always has q/k/v biases
        # A zero-width shared expert adds nothing, exactly, when the option is off.
        kwargs["shared_expert_intermediate_size"] = dense.intermediate_size if params.shared_expert else 0
    if params.top_k > params.num_experts:
        raise UpcycleError(f"upcycle.top_k ({params.top_k}) > upcycle.num_experts ({params.num_experts})")
    return config_class(**kwargs)


def upcycle(dense: LlavaForConditionalGeneration, params: UpcycleParams, seed: int = 0) -> LlavaForConditionalGeneration:
    """A new MoE LLaVA model whose outputs equal ``dense``'s (vision tower and projector copied as they are)."""
    dense_config = dense.config
    text = moe_text_config(dense_config.text_config, params)
    config = LlavaConfig(**{**dense_config.to_dict(), "text_config": text.to_dict(), "vision_config": dense_config.vision_config.to_dict()})
    torch.manual_seed(seed)
    moe = LlavaForConditionalGeneration(config).to(next(dense.parameters()).dtype)
    _copy_weights(dense, moe, text, params, seed)
    return moe


def _copy_weights(dense, moe, text, params: UpcycleParams, seed: int) -> None:
    source = dense.state_dict()
    target = moe.state_dict()
    generator = torch.Generator().manual_seed(seed)
    consumed: set[str] = set()
    moe_set = set(range(text.num_hidden_layers)) - set(text.mlp_only_layers)
    E = params.num_experts
    with torch.no_grad():
        for key, dst in target.items():
            prefix, layer, rest = _split_layer_key(key)
            if layer is None or layer not in moe_set or not rest.startswith("mlp."):
                _assign(dst, source, key, consumed)
                continue
            ffn = f"{prefix}{layer}.mlp."
            gate, up, down = (source[ffn + f"{name}_proj.weight"] for name in ("gate", "up", "down"))
            consumed.update(ffn + f"{name}_proj.weight" for name in ("gate", "up", "down"))
            if rest == "mlp.experts.gate_up_proj":
                value = torch.cat([gate, up], dim=0).unsqueeze(0).expand(E, -1, -1)
            elif rest == "mlp.experts.down_proj":
                value = down.unsqueeze(0).expand(E, -1, -1)
            elif rest == "mlp.gate.weight":
                if params.router_init == "zeros":
                    value = torch.zeros_like(dst)
                else:
                    value = torch.randn(dst.shape, generator=generator) * params.router_std
            elif rest in ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight") and params.shared_expert:
                value = gate if "gate_proj" in rest else up
            elif rest.startswith(("mlp.shared_expert.", "mlp.shared_expert_gate.")):
                # The shared expert starts silent (zero output; zero width when off), so upcycling stays exact.
                value = torch.zeros_like(dst)
            else:
                raise UpcycleError(f"{key}: no rule to initialise this MoE parameter")
            if tuple(value.shape) != tuple(dst.shape):
                raise UpcycleError(f"{key}: built {tuple(value.shape)}, the MoE model expects {tuple(dst.shape)}")
            dst.copy_(value)
    left = sorted(set(source) - consumed)
    if left:
        raise UpcycleError(f"dense weights not carried over: {left[:5]}{' ...' if len(left) > 5 else ''}")


def _split_layer_key(key: str) -> tuple[str, int | None, str]:
    """``model.language_model.layers.3.mlp.gate.weight`` -> (``...layers.``, 3, ``mlp.gate.weight``)."""
    marker = "language_model.layers."
    if marker not in key:
        return key, None, ""
    head, tail = key.split(marker, 1)
    index, rest = tail.split(".", 1)
    return head + marker, int(index), rest


def _assign(dst: torch.Tensor, source: dict, key: str, consumed: set[str]) -> None:
    if key not in source:
        raise UpcycleError(f"{key}: the MoE model has it, the dense model does not")
    if tuple(source[key].shape) != tuple(dst.shape):
        raise UpcycleError(f"{key}: dense {tuple(source[key].shape)} != MoE {tuple(dst.shape)}")
    dst.copy_(source[key])
    consumed.add(key)


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE routers of ``model``, in layer order (empty for a dense model)."""
    return [m for m in model.modules() if isinstance(m, ROUTER_TYPES)]


class RouterLogits:
    """Collects router logits during a forward pass with forward hooks.

    transformers' ``LlavaModel`` does not pass ``output_router_logits`` through to an MoE text
    model, so without this the balance loss would silently be lost::

        with RouterLogits(student) as captured:
            student(...)
        aux = load_balancing_loss(captured.logits, top_k)
    """

    def __init__(self, model: torch.nn.Module):
        self.modules = routers(model)
        self.logits: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> RouterLogits:
        self.logits = []
        self._handles = [m.register_forward_hook(self._record) for m in self.modules]
        return self

    def _record(self, module, inputs, output) -> None:
        self.logits.append(output[0])

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and those active per token (only ``top_k`` of ``E`` experts run).

    A zero-width shared expert (the default) counts as nothing.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    text = getattr(getattr(model, "config", None), "text_config", None)
    num_experts = getattr(text, "num_experts", 0) or 0
    top_k = getattr(text, "num_experts_per_tok", 0) or 0
    if num_experts:
        for name, p in model.named_parameters():
            if ".mlp.experts." in name:
                inactive += p.numel() * (num_experts - top_k) // num_experts
    return {"total": total, "active": total - inactive}
