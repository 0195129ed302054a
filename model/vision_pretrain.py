"""Pretrain the embedded teacher's vision tower and projector, text-aligned, on the world's ground truth.

Real LLaVA teachers start from CLIP, whose image features are trained against
text, and from a pretrained LLM. The embedded teacher starts from neither, so
this does what CLIP does for it, cell by cell: the projected feature of every
grid cell is scored (cosine, with CLIP's learned temperature) against the LLM's
own input embeddings of the words that describe the cell (its shape, colour,
size and position), on the training images' ground truth (never the probe
images). Afterwards the image token of a red star points where the words "red"
and "star" point, so matching a question's word to the image is a lookup the
LLM can learn, as it is for a real LLaVA. The tower then stays frozen, as
LLaVA keeps CLIP frozen: trained on with the LLM, it lost its shape features
(measured: shape separable at 0.99 after this pretraining, 0.21 after 2,000
LLaVA steps with the tower trainable, colours untouched).

A student whose LLM is built fresh has the same problem one step later: the
teacher's tower is text-aligned, but to the teacher's words, and a new
projector in front of a random LLM cannot learn from captions alone where that
LLM's words are (align's ce stays near ln(vocab)). The align stage therefore
runs the same scoring against the student's own word embeddings, tower frozen
(measured on the embedded default, no teacher, 800 steps on 2,000 records:
existence 0.55 -> 0.74, colour 0.19 -> 0.53, shape 0.15 -> 0.43).

It takes seconds. Empty cells have a learned "nothing here" vector per
attribute. The teacher's hallucinations still come from where real ones do:
the language model's prior, learned from noisy annotations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from model.world import position_name

GRID = 3  # the world places objects in a 3x3 grid
POSITIONS = [position_name((col + 0.5) / GRID, (row + 0.5) / GRID) for row in range(GRID) for col in range(GRID)]
ATTRIBUTES = ("shape", "colour", "size", "position")


def cell_labels(objects: list[dict], shapes: list[str], colours: list[str], sizes: list[str]) -> torch.Tensor:
    """``[4, 9]`` class ids per grid cell (row-major) for shape, colour, size and position; 0 means an empty cell."""
    labels = torch.zeros(len(ATTRIBUTES), GRID * GRID, dtype=torch.long)
    for obj in objects:
        cell = min(int(obj["y"] * GRID), GRID - 1) * GRID + min(int(obj["x"] * GRID), GRID - 1)
        labels[0, cell] = shapes.index(obj["shape"]) + 1
        labels[1, cell] = colours.index(obj["colour"]) + 1
        labels[2, cell] = sizes.index(obj["size"]) + 1
        labels[3, cell] = cell + 1
    return labels


def patch_cells(patches_per_side: int) -> torch.Tensor:
    """The grid cell of each ViT patch (row-major), for patch grids that are a multiple of 3 per side."""
    if patches_per_side % GRID:
        raise ValueError(f"vision pretraining needs a patch grid that is a multiple of {GRID} per side, got {patches_per_side}")
    per_cell = patches_per_side // GRID
    rows = torch.arange(patches_per_side) // per_cell
    return (rows[:, None] * GRID + rows[None, :]).reshape(-1)


def word_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Token ids of each word as it appears inside a sentence (after a space)."""
    return [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in words]


class WordTables(torch.nn.Module):
    """Per attribute, the class vectors: a learned "empty" vector, then the mean input embedding of each word's tokens."""

    def __init__(self, embeddings: torch.nn.Embedding, ids: list[list[list[int]]]):
        super().__init__()
        self.embeddings = embeddings
        self.ids = ids
        self.empty = torch.nn.Parameter(torch.randn(len(ids), embeddings.embedding_dim) * embeddings.weight.std())
        self.log_scale = torch.nn.Parameter(torch.tensor(2.3))  # CLIP's temperature, from e^2.3 = 10

    def logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Scaled cosine similarity of ``features [B, P, H]`` to each attribute's classes: ``[B, P, classes]`` each."""
        features = F.normalize(features, dim=-1)
        out = []
        for k, words in enumerate(self.ids):
            table = torch.stack([self.empty[k]] + [self.embeddings.weight[ids].mean(0) for ids in words])
            out.append(self.log_scale.exp() * features @ F.normalize(table, dim=-1).T)
        return out


def pretrain_vision(
    model,
    image_processor,
    tokenizer,
    world_dir: Path,
    shapes: list[str],
    colours: list[str],
    sizes: list[str],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    train_tower: bool = True,
) -> dict:
    """Train ``model``'s vision tower, projector and word embeddings in place; returns the loss and held-out cell accuracy.

    The features trained are those LLaVA feeds its LLM: ``vision_feature_layer``, CLS dropped, projected.
    With ``train_tower=False`` the tower is left as it is and only the projector and the words move:
    how a student with a fresh LLM learns to put the teacher's (already text-aligned) features where
    its own words are.
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
    labels = torch.stack([cell_labels(info["objects"][n], shapes, colours, sizes) for n in names])  # [N, 4, 9]

    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    vision = model.config.vision_config
    cells = patch_cells(vision.image_size // vision.patch_size)
    tables = WordTables(model.get_input_embeddings(), [word_ids(tokenizer, w) for w in (shapes, colours, sizes, POSITIONS)])
    trained = [*projector.parameters(), *tables.parameters(), *(tower.parameters() if train_tower else [])]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    held_out = max(1, len(names) // 10)
    train_n = len(names) - held_out
    layer = model.config.vision_feature_layer
    drop = 1 if model.config.vision_feature_select_strategy == "default" else 0  # CLIP's CLS; SigLIP has none

    def logits(batch_pixels: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(train_tower and torch.is_grad_enabled()):
            features = tower(batch_pixels, output_hidden_states=True).hidden_states[layer][:, drop:]
        return tables.logits(projector(features))

    def loss_of(outs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        # Position is named only for objects: an empty cell has no position word to match.
        return sum(
            F.cross_entropy(out.transpose(1, 2), target[:, k], ignore_index=0 if ATTRIBUTES[k] == "position" else -100)
            for k, out in enumerate(outs)
        )

    tower.train(train_tower)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        index = torch.randint(0, train_n, (batch_size,))
        loss = loss_of(logits(pixels[index]), labels[index][:, :, cells])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        outs = logits(pixels[train_n:])
        target = labels[train_n:][:, :, cells]
        accuracy = {}
        for k, (name, out) in enumerate(zip(ATTRIBUTES, outs, strict=True)):
            scored = target[:, k] > 0 if name == "position" else torch.ones_like(target[:, k], dtype=torch.bool)
            accuracy[name] = round((out.argmax(-1) == target[:, k])[scored].float().mean().item(), 4)
    return {"steps": steps, "final_loss": float(loss.detach()), "held_out_cell_accuracy": accuracy, "images": len(names)}
