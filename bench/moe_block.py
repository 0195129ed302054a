"""MoE block vs a dense FFN with the same *active* parameters, forward + backward, on this machine.

The dense FFN has intermediate size ``top_k * I``, so per token it does the work of the ``top_k``
experts an MoE token uses; the ratio is what routing and the stock transformers MoE kernel cost.

    python bench/moe_block.py [--tokens 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP, Qwen2MoeSparseMoeBlock

SIZES = {
    "embedded student (H 128, I 256, 4 experts, top-2)": (128, 256, 4, 2),
    "embedded teacher width (H 256, I 512, 4 experts, top-2)": (256, 512, 4, 2),
    "0.5B-class layer (H 896, I 4864, 4 experts, top-2)": (896, 4864, 4, 2),
}


def seconds(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    for _ in range(2):  # warm-up
        module(x).sum().backward()
    started = time.perf_counter()
    for _ in range(repeats):
        module(x).sum().backward()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per forward (batch x sequence)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, forward+backward")
    print(f"{'layer':<58} {'MoE ms':>9} {'dense ms':>9} {'ratio':>6}")
    for name, (hidden, intermediate, experts, top_k) in SIZES.items():
        config = Qwen2MoeConfig(
            hidden_size=hidden, moe_intermediate_size=intermediate, intermediate_size=top_k * intermediate,
            shared_expert_intermediate_size=0, num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        )  # fmt: skip
        moe = Qwen2MoeSparseMoeBlock(config)
        torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.02)
        torch.nn.init.normal_(moe.experts.down_proj, std=0.02)
        torch.nn.init.normal_(moe.gate.weight, std=0.5)
        dense = Qwen2MoeMLP(config, intermediate_size=top_k * intermediate)
        x = torch.randn(1, args.tokens, hidden, requires_grad=True)
        t_moe, t_dense = seconds(moe, x, args.repeats), seconds(dense, x, args.repeats)
        print(f"{name:<58} {t_moe * 1e3:>9.1f} {t_dense * 1e3:>9.1f} {t_moe / t_dense:>6.2f}")


if __name__ == "__main__":
    main()
