"""One distillation step: frozen teacher forward + MoE student forward/backward, every loss term on.

Prints samples/s and the peak memory the step adds (process RSS on CPU, allocator peak on GPU),
at the embedded sizes (vocabulary 512) and at a realistic vocabulary (32K), with the KL over the
vocabulary chunked (chunk_size 256) and unchunked.

    python bench/distill_step.py [--batch 32] [--seq 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from model.builders import build_llava
from model.engine import LiveTeacher, Objective, Weights, select_trainable
from model.tokenizer import train_tokenizer
from model.upcycle import upcycle
from tasks.params import TextParams, UpcycleParams, VisionParams

WEIGHTS = Weights(ce=1.0, kl_response=1.0, kl_visual=1.0, relation=0.5, router_aux=0.01)


class PeakMemory:
    """Peak bytes above the level at entry: the CUDA allocator's, or the process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.process = psutil.Process()
            self.base = self.process.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()


def models(vocab: int, device: torch.device):
    tokenizer = train_tokenizer(["a small red circle at the top left"] * 50, vocab_size=300)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(max(0, vocab - len(tokenizer)))])
    vision = VisionParams()
    teacher = build_llava(vision, TextParams(), tokenizer, seed=0)
    student = build_llava(vision, TextParams(hidden_size=128, intermediate_size=256, layers=2, heads=4, kv_heads=2), tokenizer, seed=1)
    student = upcycle(student, UpcycleParams(num_experts=4, top_k=2, layers="every_other"))
    select_trainable(student, ["projector", "experts", "router", "mlp"])
    return LiveTeacher(teacher.to(device)), student.to(device)


def batch(student, size: int, seq: int, device: torch.device) -> dict:
    config = student.config
    n_image = config.image_seq_length
    vocab = config.text_config.vocab_size
    text = torch.randint(10, vocab, (size, seq - n_image))
    ids = torch.cat([text[:, :3], torch.full((size, n_image), config.image_token_index), text[:, 3:]], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -seq // 2 :] = ids[:, -seq // 2 :]
    side = config.vision_config.image_size
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": torch.randn(size, 3, side, side)}
    return {k: v.to(device) for k, v in out.items()}


def train_step(objective: Objective, data: dict, optimizer: torch.optim.Optimizer) -> None:
    loss = objective(data)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64, help="tokens per sample, 9 image tokens included")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x {args.seq} tokens")
    print(f"{'vocabulary':>10} {'KL chunk':>9} {'samples/s':>10} {'peak MiB':>9}")
    for vocab in (512, 32768):
        teacher, student = models(vocab, device)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
        data = batch(student, args.batch, args.seq, device)
        for chunk in (10**9, 256):
            objective = Objective(student, teacher, WEIGHTS, temperature=2.0, dpo=None, chunk_size=chunk)
            train_step(objective, data, optimizer)  # warm-up: optimizer state exists before memory is measured
            with PeakMemory(device) as memory:
                started = time.perf_counter()
                for _ in range(args.steps):
                    train_step(objective, data, optimizer)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - started) / args.steps
            label = "none" if chunk >= 10**9 else str(chunk)
            print(f"{vocab:>10} {label:>9} {args.batch / seconds:>10.1f} {memory.peak / 2**20:>9.0f}")


if __name__ == "__main__":
    main()
