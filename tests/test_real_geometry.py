"""Teachers at the geometry users bring, with tiny widths: CLIP ViT-L/14-336 and SigLIP-384 towers.

LLaVA-1.5 reads CLIP at 336 px from its penultimate layer with the CLS token dropped (576 image
tokens); LLaVA-KD's SigLIP at 384 px has no CLS and keeps all 729 patches. Each tiny random
teacher is imported through the real path and the llava-mod chain runs on it under DVC, every
stage a real stage: curate, import, teacher cache, align, mimic, upcycle, mimic, preference,
evaluate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from model.builders import llava_config, text_config
from model.config import TextParams
from bench.workspace import dvc_env, make_workspace

REPO = Path(__file__).resolve().parent.parent
TOWERS = {
    # vision config, image processor, feature selection, image tokens
    "clip-336": (
        lambda: CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        lambda: CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        "default",
        576,
    ),
    "siglip-384": (
        lambda: SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        lambda: SiglipImageProcessor(size={"height": 384, "width": 384}),
        "full",
        729,
    ),
}


def real_geometry_teacher(folder: Path, tower: str, tokenizer) -> Path:
    """A random LLaVA teacher with ``tower``'s real image size, patch, token count and feature layer."""
    vision, image_processor, strategy, tokens = TOWERS[tower]
    config = llava_config(vision(), text_config(TextParams(hidden_size=48, intermediate_size=96, layers=2, heads=4, kv_heads=2), tokenizer), tokenizer)
    config.vision_feature_select_strategy, config.image_seq_length = strategy, tokens
    LlavaForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    processor = LlavaProcessor(
        image_processor=image_processor(), tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if strategy == "default" else 0, chat_template=tokenizer.chat_template,
    )  # fmt: skip
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tower", list(TOWERS))
def test_the_llava_mod_chain_runs_on_a_real_geometry_teacher(tower, tiny_tokenizer, tmp_path):
    _, _, strategy, tokens = TOWERS[tower]
    teacher = real_geometry_teacher(tmp_path / "teacher", tower, tiny_tokenizer)
    # The CI preset without its trained teacher and world tokenizer: this teacher and its tokenizer instead.
    preset = yaml.safe_load((REPO / "presets/ci.yaml").read_text())
    del preset["teacher"]["source"], preset["curate"]["tokenizer"]
    preset["curate"].update(image_tokens=tokens, max_tokens=tokens + 256)
    preset["evaluate"]["limit"] = 4
    root = make_workspace(
        tmp_path / "project",
        {
            "preset": "ci",
            "teacher": {"source": str(teacher), "sha256": None},
            "curate": {"tokenizer": {"source": str(teacher)}},
            # the chain's last student (evaluate's deps decide what runs), on a POPE split and VQA
            "evaluate": {"models": ["teacher", "pref"], "tasks": ["tinymod_pope_adversarial", "tinymod_vqa"]},
        },
    )
    (root / "presets/ci.yaml").write_text(yaml.safe_dump(preset))
    subprocess.run([sys.executable, "-m", "tasks.stages"], cwd=root, check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=root, capture_output=True, text=True, env=dvc_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ran = {line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"curate", "teacher", "teacher_cache", "align", "mimic_dense", "upcycle", "mimic_sparse", "preference", "evaluate"}

    student = AutoModelForImageTextToText.from_pretrained(root / "models/student_pref", use_safetensors=True)
    assert student.config.text_config.model_type == "qwen2_moe"
    assert (student.config.image_seq_length, student.config.vision_feature_select_strategy) == (tokens, strategy)
    assert student.config.vision_feature_layer == -2 and type(student.config.vision_config).__name__ == type(TOWERS[tower][0]()).__name__
    word_align = json.loads((root / "metrics/align.json").read_text())["word_align"]
    assert word_align["held_out_cell_accuracy"]["shape"] >= 0.0  # the world's 3x3 cells were found on this patch grid
    scores = json.loads((root / "metrics/eval.json").read_text())["models"]
    assert set(scores) == {"teacher", "pref"} and "tinymod_vqa" in scores["pref"]["tasks"]
