"""The typed sections model code reads: the vision tower, the LLM, upcycling.

``tasks/params.py`` assembles and validates the whole configuration from these and the stage
sections; ``model/`` takes what it needs from here and never imports ``tasks/``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

TEACHER_TERMS = ("kl_response", "kl_visual", "relation")  # the loss terms that read the teacher


class Section(BaseModel):
    """A params section: unknown keys are errors and every field carries its docstring."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True, frozen=True)


class VisionParams(Section):
    image_size: int = Field(48, ge=12)
    """Input resolution of the vision tower (CLIP ViT)."""
    patch_size: int = Field(16, ge=1)
    """ViT patch side; the LLM sees (image_size / patch_size)^2 image tokens."""
    hidden_size: int = Field(128, ge=8)
    """Width of the vision tower."""
    intermediate_size: int = Field(256, ge=8)
    """FFN width of the vision tower."""
    layers: int = Field(3, ge=1)
    """Transformer layers in the vision tower."""
    heads: int = Field(4, ge=1)
    """Attention heads in the vision tower."""


class TextParams(Section):
    family: Literal["qwen2", "qwen3"] = "qwen2"
    """Stock transformers architecture of the LLM; upcycling maps qwen2 -> qwen2_moe, qwen3 -> qwen3_moe."""
    hidden_size: int = Field(256, ge=8)
    """Width of the LLM."""
    intermediate_size: int = Field(512, ge=8)
    """FFN width of the LLM (each expert's width after upcycling)."""
    layers: int = Field(4, ge=1)
    """Decoder layers."""
    heads: int = Field(4, ge=1)
    """Attention heads."""
    kv_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention); must divide `heads`."""
    max_position_embeddings: int = Field(1024, ge=16)
    """Longest sequence the rotary embedding is set up for."""
    tie_embeddings: bool = True
    """Share the input embedding and the LM head."""


class UpcycleParams(Section):
    num_experts: int = Field(4, ge=1, le=256)
    """Experts per MoE layer, each a copy of the dense FFN (1 with top_k 1: a dense FFN in MoE form, for dense baselines)."""
    top_k: int = Field(2, ge=1)
    """Experts each token is routed to (weights renormalised over the top k)."""
    layers: Literal["every_other", "every_other_from_1", "first_half", "second_half", "all"] | list[Annotated[int, Field(ge=0)]] = "every_other"
    """Which decoder layers become MoE: every_other (0, 2, 4, ...: LLaVA-MoD's range(L)[::2]), every_other_from_1 (1, 3, ...), first_half, second_half, all, or a list of indices."""
    router_init: Literal["zeros", "normal"] = "normal"
    """Router weights at upcycling: zeros (uniform routing) or normal with `router_std`. Either keeps the output exact."""
    router_std: float = Field(0.02, ge=0.0)
    """Standard deviation of a normal router init."""
    shared_expert: bool = False
    """Add a shared expert (qwen2 family only): a copy of the dense FFN whose output projection starts at zero."""
