"""One distillation step: frozen teacher forward + MoE student forward/backward, every loss term on.

Prints samples/s and the peak memory the step adds (process RSS on CPU, allocator peak on GPU),
at the embedded sizes (vocabulary 512) and at a realistic vocabulary (32K), with the KL over the
vocabulary chunked (chunk_size 256) and unchunked.

    python bench/distill_step.py [--batch 32] [--seq 64] [--steps 5]
    python bench/distill_step.py --real [--batch 8] [--steps 5] [--peak-tflops 989]

``--real`` is a 0.5B-class student at the geometry users run: Qwen2 hidden 896, 24 layers, 4
experts top-2 on alternate layers, vocabulary 151,936, 576 image tokens from a CLIP ViT-L/14-336
tower, with a frozen teacher about 3x its active size (Qwen2-1.5B widths, 36 layers), in bf16 on CUDA (autocast, fp32 master
weights, teacher in bf16 with no gradients). It prints samples/s, peak memory and the model FLOPs
utilisation against the card's bf16 dense peak (H100 / H200: 989 TFLOP/s; else --peak-tflops). On
a CPU it runs the same vocabulary, image tokens and expert layout at 2 layers and a quarter of the
widths, and prints no MFU: a CPU has no bf16 peak worth dividing by.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

import psutil
import torch

from model.builders import build_llava
from model.config import LossWeights, TrainingParams
from model.data import DistillBatch
from model.engine import LiveTeacher, Objective, loss_terms, select_trainable
from model.tokenizer import train_tokenizer
from model.upcycle import upcycle
from tasks.params import TextParams, UpcycleParams, VisionParams

WEIGHTS = LossWeights(ce=1.0, kl_response=1.0, kl_visual=1.0, relation=0.5, router_aux=0.01)


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


def batch(student, size: int, seq: int, device: torch.device) -> DistillBatch:
    config = student.config
    n_image = config.image_seq_length
    vocab = config.text_config.vocab_size
    text = torch.randint(10, vocab, (size, seq - n_image))
    ids = torch.cat([text[:, :3], torch.full((size, n_image), config.image_token_index), text[:, 3:]], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -seq // 2 :] = ids[:, -seq // 2 :]
    side = config.vision_config.image_size
    return DistillBatch(ids, torch.ones_like(ids), labels, torch.randn(size, 3, side, side)).to(device)


def objective_for(student, teacher: LiveTeacher, weights: LossWeights, temperature: float, chunk_size: int) -> Objective:
    """The objective a training stage with these weights builds (the engine's own ``loss_terms``)."""
    train = TrainingParams(loss=weights, temperature=temperature, chunk_size=chunk_size)
    return Objective(student, teacher, loss_terms(train, None, getattr(student.config.text_config, "num_experts_per_tok", 0)), chunk_size)


def train_step(objective: Objective, data: DistillBatch, optimizer: torch.optim.Optimizer) -> None:
    loss = objective(data)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}


def real_models(device: torch.device):
    """Student (0.5B-class, MoE) and teacher (~3x its active parameters) at real geometry; a narrow copy on CPU."""
    from transformers import CLIPVisionConfig, LlavaForConditionalGeneration, Qwen2Config

    from model.builders import llava_config

    cuda = device.type == "cuda"
    tokenizer = train_tokenizer(["a small red circle at the top left"] * 50, vocab_size=300)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(151_936 - len(tokenizer))])
    layers, scale = (24, 1) if cuda else (2, 4)
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024 // scale, intermediate_size=4096 // scale,
        num_hidden_layers=24 if cuda else 2, num_attention_heads=16 // scale, projection_dim=768 // scale,
    )  # fmt: skip

    def text(hidden: int, inter: int, n_layers: int, heads: int) -> Qwen2Config:
        return Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden // scale, intermediate_size=inter // scale, num_hidden_layers=n_layers,
            num_attention_heads=max(1, heads // scale), num_key_value_heads=2 if cuda else 1, max_position_embeddings=4096,
            tie_word_embeddings=True,
        )  # fmt: skip

    student = LlavaForConditionalGeneration(llava_config(vision, text(896, 4864, layers, 14), tokenizer))
    student = upcycle(student, UpcycleParams(num_experts=4, top_k=2, layers="every_other"))
    select_trainable(student, ["projector", "llm"])
    # Qwen2-1.5B widths at 36 layers: ~1.9B, about 3x the student's ~0.65B active (0.49B dense + the second expert of 12 layers)
    teacher = LlavaForConditionalGeneration(llava_config(vision, text(1536, 8960, 36 if cuda else 2, 12), tokenizer))
    teacher = teacher.to(device, torch.bfloat16 if cuda else torch.float32)
    return LiveTeacher(teacher), student.to(device)


def active_llm_parameters(model) -> int:
    """Parameters one token passes through in the language model: top-k of the experts, not all of them."""
    config = model.config.text_config
    total = sum(p.numel() for p in model.model.language_model.parameters())
    experts = [p for n, p in model.model.language_model.named_parameters() if ".mlp.experts." in n]
    if experts:
        per_expert = sum(p.numel() for p in experts) / config.num_experts
        total -= per_expert * (config.num_experts - config.num_experts_per_tok)
    return int(total + model.lm_head.weight.numel() * (not config.tie_word_embeddings))


def real(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, student = real_models(device)
    seq = 576 + args.seq
    active, teacher_params = active_llm_parameters(student), active_llm_parameters(teacher.model)
    tower = sum(p.numel() for p in student.model.vision_tower.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (scaled down: 2 layers, widths / 4)"
    print(f"{name}; student {active / 1e6:,.0f}M active LLM parameters, teacher {teacher_params / 1e6:,.0f}M ({teacher_params / active:.1f}x), "
          f"tower {tower / 1e6:,.0f}M; vocabulary {student.config.text_config.vocab_size:,}, batch {args.batch} x {seq} tokens (576 image)")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    objective = objective_for(student, teacher, LossWeights(ce=1.0, kl_response=1.0, router_aux=0.01), temperature=1.0, chunk_size=1024)
    data = batch(student, args.batch, seq, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = objective(data)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up: optimizer state and kernels exist before anything is measured
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
    tokens = args.batch * seq
    # Model FLOPs: student LLM forward + backward (6 N T), teacher LLM forward (2 N T), the frozen tower
    # forward twice (student and teacher each encode the images; 2 N per patch).
    flops = 6 * active * tokens + 2 * teacher_params * tokens + 2 * 2 * tower * args.batch * 577
    print(f"samples/s {args.batch / seconds:.2f}, tokens/s {tokens / seconds:,.0f}, peak memory {memory.peak / 2**30:.2f} GiB, "
          f"{flops / seconds / 1e12:.2f} TFLOP/s achieved")
    if device.type == "cuda":
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak is None:
            print(f"MFU: unknown bf16 peak for {name}; pass --peak-tflops")
        else:
            print(f"MFU {flops / seconds / 1e12 / peak:.1%} of {peak:.0f} TFLOP/s bf16 dense")
    else:
        print("MFU: not reported on CPU (run on a GPU for the figure)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64, help="tokens per sample, 9 image tokens included")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--real", action="store_true", help="a 0.5B-class MoE student and a ~3x teacher at real geometry (see above)")
    parser.add_argument("--peak-tflops", type=float, help="the card's bf16 dense peak, if its name is not known")
    args = parser.parse_args()
    if args.real:
        return real(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x {args.seq} tokens")
    print(f"{'vocabulary':>10} {'KL chunk':>9} {'samples/s':>10} {'peak MiB':>9}")
    for vocab in (512, 32768):
        teacher, student = models(vocab, device)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
        data = batch(student, args.batch, args.seq, device)
        for chunk in (10**9, 256):
            objective = objective_for(student, teacher, WEIGHTS, temperature=2.0, chunk_size=chunk)
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
