"""The loss is one per-token mean over the step, whatever the micro-batch size and rank count."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

from model.data import DistillBatch
from model.engine import response_tokens, token_shares
from tasks.training import job_env

from .test_engine import batch_with_labels, objective_of


def uneven_batch(model, tokenizer) -> dict:
    """Four samples whose response lengths differ (1, 2, 4 and 6 supervised tokens)."""
    one = batch_with_labels(model, tokenizer)
    batch = {k: torch.cat([v, v]) for k, v in one.items()}
    labels = torch.full_like(batch["labels"], -100)
    for row, length in enumerate((2, 3, 5, 7)):
        labels[row, -length - 1 : -1] = batch["input_ids"][row, -length - 1 : -1]
    batch["labels"] = labels
    return batch


def test_token_shares_add_up_to_one_mean_over_the_step():
    assert token_shares([10], 10.0, world=1) == [1.0]
    # Micro-batches of 1 and 3 tokens: equal weights would give each half; per-token, 1/4 and 3/4.
    shares = token_shares([1, 3], 4.0, world=1)
    assert [s / 2 for s in shares] == [0.25, 0.75]  # DeepSpeed divides each by 2 accumulation steps
    # Two ranks, the other holding 4 tokens: this rank's 1 and 3 are 1/8 and 3/8 of the step.
    assert [s / 2 / 2 for s in token_shares([1, 3], 8.0, world=2)] == [0.125, 0.375]


@pytest.mark.parametrize("kd", [False, True])
def test_micro_batches_of_a_quarter_give_the_full_batch_loss_and_gradients(tiny_llava, tiny_tokenizer, kd):
    torch.manual_seed(0)
    teacher_model = type(tiny_llava)(tiny_llava.config).eval() if kd else None
    from model.engine import LiveTeacher

    teacher = LiveTeacher(teacher_model) if kd else None
    weights = {"ce": 1.0, "kl_response": 0.5} if kd else {"ce": 1.0}
    objective = objective_of(tiny_llava, teacher, chunk_size=3, **weights)
    batch = DistillBatch(**uneven_batch(tiny_llava, tiny_tokenizer))

    full = objective(batch)["loss"]
    full.backward()
    trained = [p for p in objective.parameters() if p.grad is not None]
    expected = [p.grad.clone() for p in trained]
    objective.zero_grad()

    rows = uneven_batch(tiny_llava, tiny_tokenizer)
    micro = [DistillBatch(**{k: v[i : i + 1] for k, v in rows.items()}) for i in range(4)]
    shares = token_shares([response_tokens(m) for m in micro], float(response_tokens(batch)), world=1)
    total = 0.0
    for m, share in zip(micro, shares, strict=True):
        m.token_share = torch.tensor(share)
        loss = objective(m)["loss"] / len(micro)  # as DeepSpeed scales it
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full.item(), rel=1e-5)
    for p, g in zip(trained, expected, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)

    # Without the shares, micro-batches count equally: the shortest response weighs as much as the longest.
    objective.zero_grad()
    unweighted = sum(objective(dataclasses.replace(m, token_share=1.0))["loss"].item() / len(micro) for m in micro)
    assert abs(unweighted - full.item()) > 1e-3


def test_deepspeed_accumulation_divides_by_the_steps_as_the_shares_assume(tmp_path):
    """DeepSpeed (ZeRO-2, gloo) scales each micro-batch loss by 1 / gradient_accumulation_steps."""
    script = textwrap.dedent(
        """
        import json, sys, torch, deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
        grads = {}
        for gas in (1, 4):
            torch.manual_seed(0)
            model = torch.nn.Linear(3, 1, bias=False)
            config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4 // gas, "gradient_accumulation_steps": gas,
                      "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "optimizer": {"type": "SGD", "params": {"lr": 1.0}}}
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            x = torch.arange(12.0).view(4, 3)
            before = model.weight.detach().clone()
            for i in range(gas):
                rows = x[i * (4 // gas) : (i + 1) * (4 // gas)]
                engine.backward(engine(rows).sum() / len(rows))  # a per-sample mean of this micro-batch
                engine.step()
            grads[gas] = (before - model.weight.detach()).tolist()  # SGD, lr 1: the applied gradient
        print(json.dumps(grads))
        """
    )
    # the stages' own job environment, so this job finds set-up's op build as they do
    env = {**job_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    grads = json.loads(out.stdout.strip().splitlines()[-1])
    # Equal-sized micro-batches: the mean of their means is the batch mean, so DeepSpeed must divide by 4.
    assert torch.allclose(torch.tensor(grads["1"]), torch.tensor(grads["4"]), atol=1e-5), grads
