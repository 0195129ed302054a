"""Build, load and save LLaVA models as stock ``transformers`` classes.

Teacher and student are ``LlavaForConditionalGeneration``: a CLIP vision
tower, LLaVA's 2-layer GELU projector and a causal LM (Qwen2 / Qwen3, or
their MoE versions after upcycling). Checkpoints are saved as safetensors with
their processor, tokenizer and chat template, so plain ``transformers`` loads
them with no tinymod code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch


class _PilFallbackNotice(logging.Filter):
    """Drops transformers' notice that CLIP's image processor runs on PIL without torchvision.

    That is the intended CPU path (the registry's torchvision wheel is CUDA-only, so the stack
    leaves it out) and every stage, rank and evaluation printed it; other warnings pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


if not torch.cuda.is_available():
    # Named, DeepSpeed skips its accelerator detection, which warns in the stage (transformers asks
    # DeepSpeed about ZeRO-3 when it saves) and in every rank that it fell back to the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Before transformers resolves CLIPImageProcessor, which is where it warns.
logging.getLogger("transformers.utils.import_utils").addFilter(_PilFallbackNotice())

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)

from model.errors import CheckpointError, TinymodError  # noqa: F401 - CheckpointError is imported from here too
from model.tokenizer import IMAGE_TOKEN
from model.config import TextParams, VisionParams

TEXT_CONFIGS = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}

transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: the stage's own bar is the progress
# An MoE student without a shared expert has one of zero width (exactly nothing, see model/upcycle.py);
# torch warns that initialising it does nothing, in every stage and rank that builds one.
warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op", category=UserWarning)


def vision_config(v: VisionParams) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        projection_dim=v.hidden_size,
    )


def text_config(t: TextParams, tokenizer: PreTrainedTokenizerBase):
    shape = t.config_fields()
    del shape["model_type"]  # the family picks the config class, which fixes it
    return TEXT_CONFIGS[t.family](
        vocab_size=len(tokenizer),
        **shape,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def llava_config(vision, text, tokenizer: PreTrainedTokenizerBase, like: LlavaConfig | None = None) -> LlavaConfig:
    """A LLaVA config; ``like`` (the teacher's) decides how image features are read, so a student
    reads its tower exactly as the teacher does: CLIP at 336/14 drops CLS for 576 tokens from layer
    -2, SigLIP at 384/14 keeps all 729 patches (it has no CLS)."""
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=like.image_seq_length if like is not None else image_tokens,
        # default: drop CLS, one LLM token per patch (CLIP); full: every token (SigLIP)
        vision_feature_select_strategy=like.vision_feature_select_strategy if like is not None else "default",
        vision_feature_layer=like.vision_feature_layer if like is not None else -2,
        projector_hidden_act=like.projector_hidden_act if like is not None else "gelu",
        tie_word_embeddings=text.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_llava(vision: VisionParams, text: TextParams, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlavaForConditionalGeneration:
    """A freshly initialised LLaVA model (the embedded teacher)."""
    torch.manual_seed(seed)
    config = llava_config(vision_config(vision), text_config(text, tokenizer), tokenizer)
    return LlavaForConditionalGeneration(config)


def build_processor(tokenizer: PreTrainedTokenizerBase, vision: CLIPVisionConfig) -> LlavaProcessor:
    """LLaVA's processor for this tokenizer and vision tower: resize to the tower's input, normalise."""
    side = vision.image_size
    image_processor = CLIPImageProcessor(
        size={"height": side, "width": side},
        crop_size={"height": side, "width": side},
        do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
    )


def build_student(
    teacher: LlavaForConditionalGeneration, text: TextParams, llm: str, tokenizer: PreTrainedTokenizerBase, seed: int
) -> LlavaForConditionalGeneration:
    """The teacher's vision tower (copied, to be frozen), a new projector, and a new or pretrained small LLM."""
    torch.manual_seed(seed)
    if llm == "init":
        student_text = text_config(text, tokenizer)
    else:
        student_text = AutoConfig.from_pretrained(llm, trust_remote_code=False)
        check_vocab(tokenizer, AutoTokenizer.from_pretrained(llm), f"student LLM {llm}")
    config = llava_config(teacher.config.vision_config, student_text, tokenizer, like=teacher.config)
    student = LlavaForConditionalGeneration(config)
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    if llm != "init":
        pretrained = AutoModelForCausalLM.from_pretrained(llm, trust_remote_code=False, use_safetensors=True)
        copy_language_model(pretrained, student)
    return student


def copy_language_model(causal_lm, llava: LlavaForConditionalGeneration) -> None:
    """Copy a causal LM's decoder and head into a LLaVA model, every key and shape checked."""
    source = causal_lm.model.state_dict()
    target = llava.model.language_model.state_dict()
    missing, extra = sorted(set(target) - set(source)), sorted(set(source) - set(target))
    if missing or extra:
        raise CheckpointError(f"student LLM does not fit the LLaVA text model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in source.items():
        if value.shape != target[key].shape:
            raise CheckpointError(f"student LLM {key}: shape {tuple(value.shape)} != {tuple(target[key].shape)}")
    llava.model.language_model.load_state_dict(source)
    llava.lm_head.load_state_dict(causal_lm.lm_head.state_dict())


def save_checkpoint(model, processor: LlavaProcessor, out: Path) -> None:
    """Safetensors + config + processor + tokenizer + chat template, written atomically."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def fetch(ref: str, cache: Path) -> Path:
    """A local folder for ``ref``: itself if local, else an ``s3://bucket/prefix`` downloaded through boto3."""
    if not ref.startswith("s3://"):
        path = Path(ref)
        if not path.is_dir():
            raise CheckpointError(f"{ref}: no such folder; give a local checkpoint folder or an s3://bucket/prefix URI")
        return path
    from model.s3 import download_prefix  # boto3 only when S3 is used

    return download_prefix(ref, cache)


def validate_checkpoint(path: Path, student_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Refuse what tinymod cannot distil from, before anything trains. Never runs remote code or unpickles."""
    problems: list[str] = []
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
        problems.append(f"no *.safetensors weights{hint}")
    config_file = path / "config.json"
    if not config_file.exists():
        problems.append("no config.json")
    else:
        config = json.loads(config_file.read_text())
        if config.get("model_type") != "llava":
            problems.append(f"config.json model_type is {config.get('model_type')!r}, expected 'llava' (LlavaForConditionalGeneration)")
    for file in sorted(path.glob("*.json")):
        # Tokenizer and processor configs can ask for remote code too, not only config.json.
        try:
            asks = isinstance(data := json.loads(file.read_text()), dict) and bool(data.get("auto_map"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            problems.append(f"{file.name} is not valid JSON: {error}")
            continue
        if asks:
            problems.append(f"{file.name} asks for remote code (auto_map); tinymod never sets trust_remote_code")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        problems.append(f"no loadable tokenizer: {error}")
        tokenizer = None
    if tokenizer is not None and IMAGE_TOKEN not in tokenizer.get_vocab():
        problems.append(f"the tokenizer has no {IMAGE_TOKEN} token")
    try:
        processor = AutoProcessor.from_pretrained(path)
        if not hasattr(processor, "image_processor"):
            problems.append("the processor has no image processor")
    except (OSError, ValueError) as error:
        problems.append(f"no loadable image processor (preprocessor_config.json): {error}")
    if problems:
        raise CheckpointError(f"teacher checkpoint {path} cannot be used:\n  - " + "\n  - ".join(problems))
    if student_tokenizer is not None and tokenizer is not None:
        check_vocab(student_tokenizer, tokenizer, f"teacher {path}")


def check_vocab(student: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, what: str) -> None:
    """KL between teacher and student needs one tokenizer: the same tokens at the same ids.

    The models' embedding matrices may still differ in size (a family pads them differently:
    Qwen2-7B has 152,064 rows, Qwen2-0.5B 151,936, for one 151,646-token tokenizer); the losses
    compare the tokenizer's tokens only (``model.losses.SharedVocabHead``). A true mismatch is
    refused with the first ids whose tokens differ.
    """
    ours, theirs = student.get_vocab(), other.get_vocab()
    if ours == theirs:
        return
    by_id = [{i: t for t, i in vocab.items()} for vocab in (ours, theirs)]
    ids = sorted(set(by_id[0]) | set(by_id[1]))
    differing = [i for i in ids if by_id[0].get(i) != by_id[1].get(i)]
    shown = ", ".join(f"id {i}: {by_id[0].get(i, '(none)')!r} vs {by_id[1].get(i, '(none)')!r}" for i in differing[:3])
    raise CheckpointError(
        f"vocabulary mismatch: the student tokenizer (models/tokenizer, {len(ours)} tokens) and {what} ({len(theirs)} tokens) "
        f"differ at {len(differing)} ids, first {shown}; distillation compares distributions over one shared vocabulary. "
        "Set curate.tokenizer.source to the teacher's folder."
    )


def load_llava(path: Path, dtype: torch.dtype = torch.float32):
    """Load a checkpoint the way a user would: plain transformers, safetensors only, no remote code."""
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
