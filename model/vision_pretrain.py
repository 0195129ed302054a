"""Pretrain the embedded teacher's vision tower on the world's ground truth, cell by cell.

Real LLaVA teachers start from a pretrained CLIP encoder; a LLaVA trained from
scratch learns its language prior long before it learns to look (measured
here: a from-scratch 3M teacher answered every POPE question "no" after 600
steps). The embedded teacher's tower is pretrained the same way in spirit:
supervised to name the shape, colour and size in each cell of the world's 3x3
grid from the ViT patches of that cell, on the training images' ground truth
(never the probe images). It takes seconds; the linear heads are discarded and
the teacher's hallucinations still come from where real ones do, the language
model's prior learned from noisy annotations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

GRID = 3  # the world places objects in a 3x3 grid


def cell_labels(objects: list[dict], shapes: list[str], colours: list[str], sizes: list[str]) -> torch.Tensor:
    """``[3, 9]`` class ids per grid cell (row-major) for shape, colour and size; 0 means an empty cell."""
    labels = torch.zeros(3, GRID * GRID, dtype=torch.long)
    for obj in objects:
        cell = min(int(obj["y"] * GRID), GRID - 1) * GRID + min(int(obj["x"] * GRID), GRID - 1)
        labels[0, cell] = shapes.index(obj["shape"]) + 1
        labels[1, cell] = colours.index(obj["colour"]) + 1
        labels[2, cell] = sizes.index(obj["size"]) + 1
    return labels


def patch_cells(patches_per_side: int) -> torch.Tensor:
    """The grid cell of each ViT patch (row-major), for patch grids that are a multiple of 3 per side."""
    if patches_per_side % GRID:
        raise ValueError(f"vision pretraining needs a patch grid that is a multiple of {GRID} per side, got {patches_per_side}")
    per_cell = patches_per_side // GRID
    rows = torch.arange(patches_per_side) // per_cell
    return (rows[:, None] * GRID + rows[None, :]).reshape(-1)


def pretrain_vision(
    model,
    image_processor,
    world_dir: Path,
    shapes: list[str],
    colours: list[str],
    sizes: list[str],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> dict:
    """Train ``model``'s vision tower in place; returns the final loss and held-out per-cell accuracy.

    The features trained are those LLaVA feeds its projector (``vision_feature_layer``, CLS dropped).
    """
    torch.manual_seed(seed)
    info = json.loads((world_dir / "world.json").read_text())
    names = sorted(n for n in info["objects"] if n.startswith(("images/general-", "images/multitask-")))
    if len(names) < 20:
        raise ValueError(f"{world_dir}: only {len(names)} training images for vision pretraining")
    images = []
    for name in names:
        with Image.open(world_dir / name) as image:
            images.append(image.convert("RGB"))
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    labels = torch.stack([cell_labels(info["objects"][n], shapes, colours, sizes) for n in names])  # [N, 3, 9]

    tower = model.model.vision_tower
    vision = model.config.vision_config
    cells = patch_cells(vision.image_size // vision.patch_size)
    heads = torch.nn.ModuleList([torch.nn.Linear(vision.hidden_size, n + 1) for n in (len(shapes), len(colours), len(sizes))])
    optimizer = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=lr)
    held_out = max(1, len(names) // 10)
    train_n = len(names) - held_out
    layer = model.config.vision_feature_layer

    def logits(batch_pixels: torch.Tensor) -> list[torch.Tensor]:
        features = tower(batch_pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        return [head(features) for head in heads]

    tower.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        index = torch.randint(0, train_n, (batch_size,))
        target = labels[index][:, :, cells]  # [B, 3, patches]
        loss = sum(F.cross_entropy(out.transpose(1, 2), target[:, k]) for k, out in enumerate(logits(pixels[index])))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        outs = logits(pixels[train_n:])
        target = labels[train_n:][:, :, cells]
        accuracy = {name: (out.argmax(-1) == target[:, k]).float().mean().item() for k, (name, out) in enumerate(zip(("shape", "colour", "size"), outs, strict=True))}
    return {"steps": steps, "final_loss": float(loss), "held_out_cell_accuracy": accuracy, "images": len(names)}
