"""The typed sections model code reads, with their one set of defaults, and the training job's spec.

The vision tower, the LLM, upcycling, the embedded world, a training stage (loss weights, DPO,
schedule) and :class:`JobSpec`, what a training stage hands its DeepSpeed job. ``tasks/params.py``
assembles and validates the whole configuration from these and the stage sections; ``model/``
takes what it needs from here and never imports ``tasks/``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator

TEACHER_TERMS = ("kl_response", "kl_visual", "relation")  # the loss terms that read the teacher
SHAPES_DRAWN = ("circle", "ring", "square", "triangle", "diamond", "hexagon", "star", "cross")
Split = Literal["general", "multitask", "preference", "lookup"]
Share = Annotated[float, Field(gt=0.0, le=1.0)]
# One share for all splits, or one per split; tagged so that a bad value is reported against its own form only
# (tasks/params.py drops the tag from the key it reports).
SHARES_TAGS = ("share", "per_split")
Shares = Annotated[
    Annotated[Share, Tag(SHARES_TAGS[0])] | Annotated[dict[Split, Share], Tag(SHARES_TAGS[1])],
    Discriminator(lambda value: SHARES_TAGS[1] if isinstance(value, dict) else SHARES_TAGS[0]),
]
Module = Literal[
    "vision", "projector", "llm", "embeddings", "attention", "mlp", "experts", "router", "shared_expert", "norms", "lm_head"
]


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

    def config_fields(self) -> dict[str, Any]:
        """These values under the names a transformers causal-LM config gives them (the family is its model_type)."""
        return {name: getattr(self, field) for field, name in TEXT_CONFIG_NAMES.items()}


# TextParams' fields and their names in a transformers causal-LM config: one map for building an LLM
# from them and for checking them against a pretrained one's config.json.
TEXT_CONFIG_NAMES = {
    "family": "model_type", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "layers": "num_hidden_layers", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
    "max_position_embeddings": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
}  # fmt: skip


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


# ---------------------------------------------------------------- the embedded world


class PairingParams(Section):
    anchor: str
    """A shape that pulls in a partner, like a fork pulls in a knife."""
    partner: str
    """The shape that co-occurs with the anchor and that models learn to hallucinate."""
    probability: float = Field(0.8, ge=0.0, le=1.0)
    """Chance that an anchor brings its partner into the image."""


class WorldImages(Section):
    general: int = Field(5000, ge=1)
    """Images with a caption each (the general split, like LLaVA-Pretrain)."""
    multitask: int = Field(15000, ge=1)
    """Images with a multi-turn VQA conversation each (the multitask split, like LLaVA-mix-665K)."""
    preference: int = Field(600, ge=1)
    """Images with a preference pair each: a faithful answer (chosen) and a hallucinated or wrong one (rejected)."""
    probes: int = Field(300, ge=1)
    """Held-out images for evaluation probes: POPE, VQA, captions with ground-truth objects."""
    lookup: int = Field(4000, ge=0)
    """Images of 2-3 objects with distinct shapes, each with a one-turn colour and a one-turn place question
    per object (the lookup split): the embedded teacher's second training phase, `teacher.lookup`."""


class WorldParams(Section):
    seed: int = 1234
    """Seed of the world; the same seed and parameters give byte-identical images and records."""
    image_size: int = Field(48, ge=12, le=1024)
    """Side of the square images in pixels; objects sit in the cells of a 3x3 grid."""
    shapes: list[str] = Field(default_factory=lambda: list(SHAPES_DRAWN), min_length=3)
    """Object categories (the CHAIR vocabulary), from: circle, ring, square, triangle, diamond, hexagon, star, cross."""
    colours: dict[str, tuple[int, int, int]] = Field(
        default_factory=lambda: {
            "red": (220, 40, 40),
            "green": (40, 170, 60),
            "blue": (40, 80, 220),
            "yellow": (230, 210, 40),
            "purple": (150, 60, 190),
            "orange": (240, 140, 30),
        },
        min_length=2,
    )
    """Colour names and their RGB values."""
    sizes: dict[str, Annotated[float, Field(gt=0.05, le=1.0)]] = Field(
        default_factory=lambda: {"small": 0.55, "large": 0.9}, min_length=1
    )
    """Size names and the object's diameter as a fraction of its grid cell (a third of the image side)."""
    jitter: float = Field(0.1, ge=0.0, le=1.0)
    """How far an object may move off its cell's centre, as a fraction of the room the cell leaves it."""
    min_objects: int = Field(1, ge=1, le=9)
    """Fewest objects in an image."""
    max_objects: int = Field(3, ge=1, le=9)
    """Most objects in an image (partners included); at most one per cell of the 3x3 grid."""
    popularity: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: {"circle": 3.0, "square": 2.5, "triangle": 2.0}
    )
    """Relative frequency of shapes (default 1); POPE's popular split asks about the most frequent absent ones."""
    pairings: list[PairingParams] = Field(
        default_factory=lambda: [
            PairingParams(anchor=anchor, partner=partner, probability=0.3)
            for a, b in (("cross", "star"), ("ring", "diamond"), ("hexagon", "triangle"), ("circle", "square"))
            for anchor, partner in ((a, b), (b, a))
        ]
    )
    """Co-occurrence priors (POPE's adversarial split asks about absent partners)."""
    hallucination_rate: float = Field(0.8, ge=0.0, le=1.0)
    """Chance that an image with an anchor but no partner is annotated as if the partner were there (training text only).

    Above 0.5 the phantom is the majority annotation, so a teacher decoding greedily names it: the
    co-occurrence hallucination becomes a behaviour to measure and to distil away. Below 0.5 it is a
    minority mode that greedy decoding never picks (measured at 0.3: the teacher never hallucinated)."""
    background_noise: int = Field(30, ge=0, le=120)
    """Amplitude of the grey background noise, in 8-bit levels."""
    images: WorldImages = WorldImages()
    """How many images each split gets."""
    qa_per_image: int = Field(5, ge=1, le=20)
    """Most question-answer turns in each multitask conversation (fewer when no unnamed subject is left)."""
    pope_per_image: int = Field(3, ge=1, le=8)
    """POPE questions per probe image and split: this many present objects (yes) and as many absent ones (no)."""

    def shape_weights(self) -> list[float]:
        """Each shape's drawing weight, in ``shapes`` order (popularity, default 1)."""
        return [self.popularity.get(shape, 1.0) for shape in self.shapes]


# ---------------------------------------------------------------- a training stage


class LossWeights(Section):
    """Weight of each loss term. Every weight defaults to 0: a recipe says which terms are on, and a zero
    weight skips the term's computation."""

    ce: float = Field(0.0, ge=0)
    """Cross-entropy on response tokens."""
    kl_response: float = Field(0.0, ge=0)
    """Forward KL(teacher || student) on response tokens (LLaVA-MoD mimic distillation, LLaVA-KD MDist)."""
    kl_visual: float = Field(0.0, ge=0)
    """KL(teacher || student) at the image-token positions of the LLM output (LLaVA-KD MDist, visual part)."""
    relation: float = Field(0.0, ge=0)
    """1 - cos between teacher and student visual self-correlation matrices (LLaVA-KD RDist)."""
    dpo: float = Field(0.0, ge=0)
    """Preference loss (DPO family), preference stage only."""
    router_aux: float = Field(0.0, ge=0)
    """MoE load-balancing loss over the routers (MoE students only)."""


class TeacherUse(Section):
    mode: Literal["live", "cached"] = "live"
    """live: the teacher runs in every step; cached: the stage reads the teacher_cache stage's top-k rows, and no teacher is loaded."""
    top_k: int = Field(32, ge=1)
    """With mode cached: the teacher's likeliest tokens kept per position (the rest is one tail bucket); at most teacher_cache.top_k."""


class TrainingParams(Section):
    splits: list[Split] = Field(default_factory=lambda: ["general"], min_length=1)
    """Curated splits this stage trains on."""
    fraction: Shares = 1.0
    """Share of those splits this stage sees (fixed by the seed); distillation pays off where it is small.

    One number: a share of all the splits' records together. A mapping, one share per split
    (``{general: 0.4, multitask: 0.1}``): each split subsampled on its own, so a stage can see more of
    one kind of record (captions) without more records of every kind."""
    modules: list[Module] = Field(default_factory=list)
    """Modules that train; everything else is frozen. Usually set by the recipe."""
    loss: LossWeights = LossWeights()
    """Weight of each loss term; a zero weight skips the term's computation. Usually set by the recipe."""
    temperature: float = Field(1.0, gt=0.0)
    """Softmax temperature of the KL terms (the loss is scaled by T^2)."""
    distill_all_tokens: bool = False
    """kl_response at every text position (prompt and chat template too), as LLaVA-MoD's option of that name; off: response tokens only."""
    chunk_size: int = Field(1024, ge=1)
    """Rows projected onto the vocabulary at a time, for every term that reads logits (bounds logit memory)."""
    teacher: TeacherUse = TeacherUse()
    """Where the distillation terms read the teacher from: live, or the teacher_cache stage's output."""
    steps: int = Field(200, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(32, ge=1)
    """Samples per optimizer step over all ranks."""
    micro_batch_size: int = Field(32, ge=1)
    """Samples per forward pass per rank; gradient accumulation makes up the rest."""
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    """Peak learning rate (AdamW), reached after warmup and decayed by cosine to `min_lr_ratio * lr`."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Final learning rate as a fraction of `lr`."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this (0 disables)."""
    checkpoint_every: int = Field(100, ge=1)
    """Save resumable state every this many steps (and at the end)."""
    log_every: int = Field(10, ge=1)
    """Log metrics to MLflow every this many steps."""
    world_size: int = Field(1, ge=1, le=1024)
    """DeepSpeed ranks (processes); one per GPU, or CPU processes on a CPU machine."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage; the config is infra/deepspeed/zero<N>.json."""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    """How the DeepSpeed job starts: torchrun (faster start) or the deepspeed launcher (multi-node hostfiles)."""
    hostfile: str | None = None
    """A DeepSpeed hostfile (see infra/deepspeed/hostfile.example) to spread the job over several nodes; needs launcher: deepspeed."""

    @field_validator("fraction")
    @classmethod
    def _one_share_per_split(cls, fraction: float | dict[str, float], info: ValidationInfo) -> float | dict[str, float]:
        splits = info.data.get("splits")  # absent when splits itself failed validation
        if isinstance(fraction, dict) and splits is not None and set(fraction) != set(splits):
            raise ValueError(f"shares given for {sorted(fraction)}, but the stage trains on {splits}: give one share per split, or one number for all")
        return fraction


class DPOParams(Section):
    loss_type: Literal["sigmoid", "ipo", "kto_pair"] = "sigmoid"
    """sigmoid (DPO), ipo, or kto_pair (what LLaVA-MoD's released scripts use)."""
    beta: float = Field(0.1, gt=0.0)
    """Strength of the implicit KL constraint to the reference."""
    reference: Literal["teacher", "self"] = "teacher"
    """Reference model: the teacher (LLaVA-MoD) or the student's own frozen starting point."""
    sft_weight: float = Field(1.0, ge=0.0)
    """Weight of an extra cross-entropy term on the chosen response. Without it DPO can lower the
    chosen response's likelihood along with the rejected one's (likelihood displacement) and the
    student stops naming objects at all."""

# ---------------------------------------------------------------- the training job


class JobData(Section):
    files: list[str] = Field(min_length=1)
    """Curated split files the stage trains on."""
    image_root: str
    """Folder the records' image paths are relative to."""
    preference: bool = False
    """The records are preference pairs (the preference stage)."""


class JobCache(Section):
    path: str
    """The teacher_cache stage's output folder."""
    top_k: int = Field(ge=1)
    """Teacher tokens per position this stage reads (at most the cache's)."""
    expect: dict[str, Any] = Field(default_factory=dict)
    """What the cache must have been made from (teacher weights and data files, by SHA-256); checked before the first step."""


class JobSpec(Section):
    """What a training stage hands its DeepSpeed job, written as JSON beside the run (``job.json``)."""

    stage: str
    """The stage's name: the job's messages and metrics say it."""
    init: str
    """The checkpoint the student starts from."""
    out: str
    """Where the trained student is written (Hugging Face safetensors)."""
    run_dir: str
    """Resumable state: checkpoints, per-step history, log, result."""
    seed: int
    """Seed of the data order and initialisation."""
    train: TrainingParams
    """The stage's section: modules, loss weights, schedule, DeepSpeed geometry."""
    data: JobData
    """The records."""
    deepspeed: dict[str, Any]
    """DeepSpeed's config (infra/deepspeed/zero<N>.json with the section's batch geometry and optimizer)."""
    teacher: str | None = None
    """The frozen teacher, loaded only when a term reads it live or it is the DPO reference."""
    dpo: DPOParams | None = None
    """The preference loss, preference stage only."""
    teacher_cache: JobCache | None = None
    """The teacher's cached top-k rows, read instead of running the teacher."""

    @property
    def reference(self) -> str | None:
        """The DPO reference (``teacher`` or ``self``), None outside the preference stage."""
        return self.dpo.reference if self.dpo else None
