"""Loss terms of LLaVA-MoD and LLaVA-KD: each formula a small pure function, each term a small module.

The modules at the end (:class:`CrossEntropy`, :class:`ResponseKL`, :class:`VisualKL`,
:class:`RelationKD`, :class:`RouterBalance`, :class:`DPOLoss`) are what a training stage's
objective lists, with their weights: hyper-parameters in ``__init__``, tensors in ``forward``.

Conventions shared by every function here:

- ``B`` batch, ``T`` sequence length, ``V`` vocabulary, ``H`` hidden width,
  ``N`` selected rows (positions), ``E`` experts, ``Nv`` image tokens per sample.
- ``labels`` are the *unshifted* targets of a causal LM (``-100`` = ignored):
  the logits at position ``t`` predict ``labels[t + 1]``. :func:`next_token_targets`
  does that shift once, so every term agrees on which positions are responses
  (LLaVA-MoD's released code masks KL with the unshifted labels, an off-by-one).
- A term with nothing to average over returns ``0`` (a zero tensor that still
  carries gradient), never NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, targets)`` for the logits positions that predict a response token.

    Args:
        labels: ``[B, T]`` unshifted labels, ``-100`` where not trained.

    Returns:
        mask: ``[B, T]`` bool, True at position ``t`` when ``labels[t + 1]`` is a response token.
        targets: ``[B, T]`` the token each position predicts (``-100`` where ``mask`` is False).
    """
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets != IGNORE, targets


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Row-wise forward KL(teacher || student) at a softmax temperature, scaled by ``T^2``.

    ``KL_i = T^2 * sum_v p_t(v) (log p_t(v) - log p_s(v))``, with ``p = softmax(logits / T)``
    (Hinton et al. 2015; LLaVA-MoD eq. 4 "mimic distillation").

    Args:
        student_logits: ``[N, V]``.
        teacher_logits: ``[N, V]`` (no gradient needed).
        temperature: ``T > 0``; the ``T^2`` factor keeps gradient scale independent of ``T``.

    Returns:
        ``[N]`` per-row KL in nats.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature**2


@dataclass
class TopK:
    """A teacher's distribution kept as its ``k`` most likely tokens and one bucket for the rest.

    ``ids`` and ``logprobs`` are ``[N, k]`` (log-probs at temperature 1, largest first); ``tail`` is
    ``[N]``, the log of the mass outside the top ``k`` (``-inf`` when ``k`` is the whole vocabulary).
    ``k + 1`` outcomes whose probabilities sum to one: a KL against them is a proper divergence.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor

    def to(self, device) -> TopK:
        return TopK(self.ids.to(device), self.logprobs.to(device), self.tail.to(device))

    def __getitem__(self, rows) -> TopK:
        return TopK(self.ids[rows], self.logprobs[rows], self.tail[rows])

    def truncate(self, k: int) -> TopK:
        """The top ``k`` of a larger top-k, the dropped tokens' mass folded into the tail (exact)."""
        if k >= self.ids.shape[-1]:
            return self
        tail = torch.logsumexp(torch.cat([self.tail[:, None], self.logprobs[:, k:]], dim=-1), dim=-1)
        return TopK(self.ids[:, :k], self.logprobs[:, :k], tail)


def sparse_forward_kl(student_logits: torch.Tensor, teacher: TopK, temperature: float = 1.0) -> torch.Tensor:
    """Row-wise forward KL(teacher || student) over the teacher's top-k tokens plus one tail bucket.

    ``KL_i = T^2 * sum_{b in topk + tail} p_t(b) (log p_t(b) - log p_s(b))``, where the student's
    tail is its mass outside the teacher's top-k. On those ``k + 1`` buckets both are distributions,
    so the value is a divergence: >= 0, zero when the student matches, and never above the exact
    KL (the data-processing inequality); with ``k = V`` it is the exact one. Temperature as in
    :func:`forward_kl`: the student's logits are divided by ``T``; the teacher's kept log-probs and
    its tail bucket are tempered as ``k + 1`` logits (exact at ``T = 1``, every recipe's value: the
    tail's own spread is not stored).

    Args:
        student_logits: ``[N, V]``.
        teacher: top-k rows for the same ``N`` positions.
        temperature: ``T > 0``.

    Returns:
        ``[N]`` per-row KL in nats.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    q_top = log_q.gather(-1, teacher.ids.long())
    # The student's mass outside the teacher's top-k, from its remaining logits (stable where it is tiny).
    q_tail = torch.logsumexp(log_q.scatter(-1, teacher.ids.long(), float("-inf")), dim=-1)
    log_p = F.log_softmax(torch.cat([teacher.logprobs.float(), teacher.tail.float()[:, None]], dim=-1) / temperature, dim=-1)
    log_q = torch.cat([q_top, q_tail[:, None]], dim=-1)
    p = log_p.exp()
    # A bucket the teacher gives no mass (an empty tail) adds nothing, whatever the student puts there.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1) * temperature**2


def chunked_row_means(
    hidden: torch.Tensor, head: torch.nn.Module, terms: list[tuple[Callable[..., torch.Tensor], Callable[[slice], object]]], chunk_size: int = 1024
) -> list[torch.Tensor]:
    """Each row term's mean over the ``N`` rows of ``hidden``, never materialising all logits at once.

    A row term (:class:`CrossEntropy`, :class:`ResponseKL`, :class:`VisualKL`) maps a block of the
    student's logits and the same rows of its other side to their sum. The vocabulary projection
    runs ``chunk_size`` rows at a time under activation checkpointing, once for every term, so peak
    memory holds one chunk of ``[chunk, V]`` logits instead of ``[N, V]`` for student and teacher
    (the cost that dominates distillation memory).

    Args:
        hidden: ``[N, H]`` the student's last hidden states at the rows the terms average over.
        head: the student's LM head (``H -> V``), called as a module.
        terms: ``(term, rows_of)`` pairs; ``rows_of(slice)`` gives the term's other side for those rows:
            next-token ids ``[n]``, the teacher's logits ``[n, V]`` or its cached :class:`TopK` rows.
        chunk_size: rows per chunk.

    Returns:
        one scalar per term, its sum over the rows divided by ``N`` (0, with gradient, when ``N == 0``).
    """
    rows = hidden.shape[0]
    zero = hidden.sum() * 0.0
    if rows == 0 or not terms:
        return [zero for _ in terms]
    sums = [zero for _ in terms]
    for start in range(0, rows, chunk_size):
        part = slice(start, start + chunk_size)
        others = [rows_of(part) for _, rows_of in terms]

        def chunk_sums(h: torch.Tensor, others=others) -> tuple[torch.Tensor, ...]:
            logits = head(h).float()
            return tuple(term(logits, other) for (term, _), other in zip(terms, others, strict=True))

        chunk = hidden[part]
        parts = checkpoint(chunk_sums, chunk, use_reentrant=False) if chunk.requires_grad else chunk_sums(chunk)
        sums = [total + part_sum for total, part_sum in zip(sums, parts, strict=True)]
    return [total / rows for total in sums]


def visual_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """LLaVA-KD MDist, visual part: mean forward KL over the image-token positions of the LLM output.

    ``L = mean_{b, j} KL(p_t(y_v[b, j]) || p_s(y_v[b, j]))`` over the ``Nv`` visual tokens of every
    sample (arXiv 2410.16236, eq. 5: the response and the visual tokens are both distilled).
    The formula on materialised logits; the engine computes it chunked, :class:`VisualKL` through
    :func:`chunked_row_means` over the image rows (the tests hold the two equal).

    Args:
        student_logits: ``[B, Nv, V]`` (or ``[N, V]``) logits at image-token positions.
        teacher_logits: same shape.
    """
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    return forward_kl(s, t, temperature).mean()


def relation_distillation(student_visual: torch.Tensor, teacher_visual: torch.Tensor) -> torch.Tensor:
    """LLaVA-KD RDist: ``1 - cos(R_s, R_t)`` between visual self-correlation matrices, averaged over the batch.

    ``R = y_v y_v^T`` (``[Nv, Nv]``) per sample, from the visual-token outputs ``y_v`` (``[Nv, V]``);
    the cosine is between the flattened matrices (arXiv 2410.16236, eq. 6-7). The student learns how
    its visual tokens relate to one another, not their absolute values. The formula on
    materialised logits; the engine builds ``R`` with :func:`chunked_relation` (held equal by the tests).

    Args:
        student_visual: ``[B, Nv, V]`` student outputs at image-token positions.
        teacher_visual: ``[B, Nv, V]`` teacher outputs at the same positions (``V`` may differ from
            the student's only if both are features rather than logits; the matrices are ``[Nv, Nv]``).

    Returns:
        scalar in ``[0, 2]``; 0 when ``B == 0``.
    """
    if student_visual.shape[0] == 0:
        return student_visual.sum() * 0.0
    if student_visual.shape[:2] != teacher_visual.shape[:2]:
        raise ValueError(f"visual tokens differ: student {tuple(student_visual.shape)}, teacher {tuple(teacher_visual.shape)}")
    s = student_visual.float()
    t = teacher_visual.float()
    return relation_loss((s @ s.transpose(1, 2)).flatten(1), (t @ t.transpose(1, 2)).flatten(1))


def relation_loss(student_relation: torch.Tensor, teacher_relation: torch.Tensor) -> torch.Tensor:
    """``mean_b 1 - cos(R_s[b], R_t[b])`` on flattened ``[B, Nv * Nv]`` relation matrices (RDist)."""
    if student_relation.shape[0] == 0:
        return student_relation.sum() * 0.0
    return (1.0 - F.cosine_similarity(student_relation.float(), teacher_relation.float(), dim=-1)).mean()


class SharedVocabHead(torch.nn.Module):
    """An LM head's first ``vocab`` rows: the tokens teacher and student share.

    Checkpoints of one family pad their embeddings differently (Qwen2-7B has 152,064 rows,
    Qwen2-0.5B 151,936, both with one 151,646-token tokenizer); rows past the tokenizer are no
    token, so every distribution a loss compares is over the tokenizer's vocabulary. The full head
    is called as a module and its output sliced (ZeRO-3 gathers a head's weight only inside its
    forward); with ``vocab`` equal to the head's size it is the head itself.
    """

    def __init__(self, head: torch.nn.Module, vocab: int):
        super().__init__()
        rows = head.weight.shape[0] if getattr(head.weight, "ds_numel", None) is None else head.weight.ds_shape[0]
        if vocab > rows:
            raise ValueError(f"the tokenizer has {vocab} tokens but the LM head only {rows} rows")
        self.head, self.vocab, self.rows = head, vocab, rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        return logits if self.vocab == self.rows else logits[..., : self.vocab]

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight if self.vocab == self.rows else self.head.weight[: self.vocab]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.head.bias
        return bias if bias is None or self.vocab == self.rows else bias[: self.vocab]


def chunked_relation(hidden: torch.Tensor, head: torch.nn.Linear, chunk_size: int = 1024) -> torch.Tensor:
    """RDist's ``R = y_v y_v^T`` from hidden states, without the ``[B, Nv, V]`` logits.

    ``y_v y_v^T = sum_c y_c y_c^T`` over column blocks ``y_c = h W_c^T (+ b_c)`` of the vocabulary,
    so one block of ``[B, Nv, V_c]`` logits exists at a time, sized like a ``chunk_size``-row block
    of the row terms (``B * Nv * V_c ~ chunk_size * V``); under activation checkpointing, as
    there.

    Args:
        hidden: ``[B, Nv, H]`` the model's last hidden states at image-token positions.
        head: its LM head (``H -> V``).
        chunk_size: the row budget of one block (see above).

    Returns:
        ``[B, Nv * Nv]``, float32.
    """
    batch, tokens, _ = hidden.shape
    vocab = head.weight.shape[0]
    block = max(1, chunk_size * vocab // max(1, batch * tokens))

    def block_gram(h: torch.Tensor, start: int) -> torch.Tensor:
        bias = head.bias[start : start + block] if head.bias is not None else None
        y = F.linear(h, head.weight[start : start + block], bias).float()
        return y @ y.transpose(1, 2)

    gram = hidden.new_zeros(batch, tokens, tokens, dtype=torch.float32)
    for start in range(0, vocab, block):
        if hidden.requires_grad or head.weight.requires_grad:
            gram = gram + checkpoint(block_gram, hidden, start, use_reentrant=False)
        else:
            gram = gram + block_gram(hidden, start)
    return gram.flatten(1)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load balancing over every MoE layer (Fedus et al. 2021, eq. 4-6).

    ``L = E * sum_e f_e * P_e`` where, pooled over all layers' tokens, ``f_e`` is the fraction of
    top-k assignments that go to expert ``e`` and ``P_e`` the mean router probability of ``e``.
    Uniform routing gives ``L = top_k``; this is the quantity transformers' MoE models return as
    ``aux_loss`` (LLaVA-MoD trains with it at 0.01 weight).

    Args:
        router_logits: one ``[B*T, E]`` tensor per MoE layer.
        top_k: experts per token.
        token_mask: ``[B, T]`` (1 = real token) to leave padding out; None counts every row.
    """
    if not router_logits:
        raise ValueError("no router logits: the model has no MoE layer (is the student upcycled?)")
    num_experts = router_logits[0].shape[-1]
    mask = None if token_mask is None else token_mask.reshape(-1).float()
    assigned = torch.zeros(num_experts, device=router_logits[0].device)
    prob = torch.zeros(num_experts, device=router_logits[0].device)
    rows = 0.0
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).float()  # [rows, E]
        if mask is None:
            assigned = assigned + chosen.sum(0)
            prob = prob + probs.sum(0)
            rows = rows + probs.shape[0]
        else:
            assigned = assigned + (chosen * mask[:, None]).sum(0)
            prob = prob + (probs * mask[:, None]).sum(0)
            rows = rows + mask.sum()
    if float(rows) == 0:
        return router_logits[0].sum() * 0.0
    return num_experts * torch.sum((assigned / rows) * (prob / rows))


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of each sequence's response tokens, labels shifted.

    ``log pi(y | x) = sum_{t: labels[t+1] != -100} log softmax(logits[t])[labels[t+1]]``

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` unshifted, ``-100`` outside the response.

    Returns:
        ``[B]``; 0 for a sequence with no response token.
    """
    mask, targets = next_token_targets(labels)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def chunked_sequence_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """:func:`sequence_logprobs` from hidden states, ``chunk_size`` response rows projected at a time.

    The same sums, without the ``[B, T, V]`` logits: only response rows are projected, a chunk at
    a time under activation checkpointing (as :func:`chunked_row_means`).

    Args:
        hidden: ``[B, T, H]`` last hidden states.
        head: the LM head (``H -> V``).
        labels: ``[B, T]`` unshifted, ``-100`` outside the response.

    Returns:
        ``[B]``; 0 for a sequence with no response token.
    """
    mask, targets = next_token_targets(labels)
    rows, picked_targets = hidden[mask], targets[mask]
    owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[mask]
    out = hidden.new_zeros(labels.shape[0], dtype=torch.float32)

    def chunk_logprobs(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(head(h).float(), dim=-1).gather(-1, t[:, None]).squeeze(-1)

    for start in range(0, rows.shape[0], chunk_size):
        h, t = rows[start : start + chunk_size], picked_targets[start : start + chunk_size]
        logp = checkpoint(chunk_logprobs, h, t, use_reentrant=False) if h.requires_grad else chunk_logprobs(h, t)
        out = out.index_add(0, owner[start : start + chunk_size], logp)
    return out


@dataclass
class PreferenceLoss:
    """Per-pair losses and the implicit rewards ``beta * (log pi - log pi_ref)``, each ``[B]``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    """The DPO family on response log-probabilities (LLaVA-MoD preference distillation).

    With ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``:

    - ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta * h)``, on summed log-probs.
    - ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` on length-normalised log-probs (each
      divided by its response's token count), as TRL computes it: the ``1 / (2 beta)`` target is
      defined on that per-token scale, where summed log-probs would make it depend on length.
    - ``kto_pair`` (TRL's paired KTO in DPOTrainer, which LLaVA-MoD's scripts run): with batch KL
      estimates ``z_w = clamp(mean(r_w), 0)`` and ``z_l = clamp(mean(r_l), 0)``, ``r = log pi - log pi_ref``
      (summed), ``(1 - sigmoid(beta (r_w - z_l)) + 1 - sigmoid(beta (z_w - r_l))) / 2`` per pair. As in
      TRL, the KL estimates are not detached: gradient flows through them (the KTO paper's own
      trainer stops it; LLaVA-MoD used TRL's).

    Args:
        policy_chosen, policy_rejected, reference_chosen, reference_rejected: ``[B]`` summed log-probs.
        beta: ``> 0``.
        loss_type: ``sigmoid``, ``ipo`` or ``kto_pair``.
        chosen_lengths, rejected_lengths: ``[B]`` response token counts; needed by ``ipo``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs chosen_lengths and rejected_lengths (response token counts) to normalise the log-probs")
        policy_chosen, reference_chosen = policy_chosen / chosen_lengths.clamp(min=1), reference_chosen / chosen_lengths.clamp(min=1)
        policy_rejected, reference_rejected = policy_rejected / rejected_lengths.clamp(min=1), reference_rejected / rejected_lengths.clamp(min=1)
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "kto_pair":
        chosen_kl = chosen_ratio.mean().clamp(min=0)
        rejected_kl = rejected_ratio.mean().clamp(min=0)
        losses = (1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)) + 1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio))) / 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, ipo or kto_pair")
    return PreferenceLoss(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


# ---------------------------------------------------------------- the terms as modules


class LossTerm(torch.nn.Module):
    """One term of a stage's objective: hyper-parameters in ``__init__``, tensors in ``forward``.

    ``reads_teacher``: the term compares the student with the teacher (live, or its cached rows).
    """

    reads_teacher = False


class CrossEntropy(LossTerm):
    """``ce``: next-token cross-entropy of a block of rows, ``sum_i -log p_s(y_i)``.

    LLaVA's SFT on response tokens; in the preference stage, the sft term on the chosen response.
    A row term: :func:`chunked_row_means` turns its sums into the mean over every row.

    forward: ``logits [n, V]``, ``targets [n]`` -> scalar sum.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, reduction="sum")


class ResponseKL(LossTerm):
    """``kl_response``: forward KL(teacher || student) of a block of response rows, summed.

    LLaVA-MoD's mimic distillation (eq. 4) and LLaVA-KD's MDist on the response: :func:`forward_kl`
    against the live teacher's logits, :func:`sparse_forward_kl` against its cached top-k rows.
    A row term, like :class:`CrossEntropy`.

    forward: ``logits [n, V]``, ``teacher`` (``[n, V]`` logits or :class:`TopK` rows) -> scalar sum.
    """

    reads_teacher = True

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, teacher: torch.Tensor | TopK) -> torch.Tensor:
        if isinstance(teacher, TopK):
            return sparse_forward_kl(logits, teacher, self.temperature).sum()
        return forward_kl(logits, teacher, self.temperature).sum()


class VisualKL(ResponseKL):
    """``kl_visual``: the same KL at the image-token positions of the LLM output (LLaVA-KD MDist, eq. 5).

    Every sample has the same number of image tokens, so the mean over rows is the paper's mean
    over ``(b, j)`` (:func:`visual_kl` is the formula on materialised logits).
    """


class RelationKD(LossTerm):
    """``relation``: LLaVA-KD's RDist, ``mean_b 1 - cos(R_s[b], R_t[b])`` (eq. 6-7; :func:`relation_loss`).

    forward: flattened self-correlation matrices ``[B, Nv * Nv]`` of student and teacher
    (:func:`chunked_relation`) -> scalar in ``[0, 2]``.
    """

    reads_teacher = True

    def forward(self, student_relation: torch.Tensor, teacher_relation: torch.Tensor) -> torch.Tensor:
        return relation_loss(student_relation, teacher_relation)


class RouterBalance(LossTerm):
    """``router_aux``: Switch load balancing over every MoE layer, ``E * sum_e f_e P_e`` (:func:`load_balancing_loss`).

    forward: one ``[B*T, E]`` router-logit tensor per MoE layer, ``token_mask [B, T]`` -> scalar
    (``top_k`` for uniform routing).
    """

    def __init__(self, top_k: int):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k

    def forward(self, router_logits: list[torch.Tensor], token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return load_balancing_loss(router_logits, self.top_k, token_mask)


class DPOLoss(LossTerm):
    """``dpo``: the DPO family on summed response log-probabilities (LLaVA-MoD's preference distillation).

    ``sigmoid`` (DPO), ``ipo`` (on length-normalised log-probs) or ``kto_pair`` (TRL's paired KTO):
    the formulas of :func:`preference_loss`. The reference's log-probs come with the batch, computed
    once per pair by the recipe from the frozen reference model.

    forward: policy and reference log-probs of the chosen and rejected responses ``[B]`` each, and
    their response token counts ``[B]`` -> :class:`PreferenceLoss` (per-pair losses and rewards).
    """

    def __init__(self, beta: float, loss_type: str = "sigmoid"):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if loss_type not in ("sigmoid", "ipo", "kto_pair"):
            raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, ipo or kto_pair")
        self.beta, self.loss_type = beta, loss_type

    def forward(
        self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
        chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
    ) -> PreferenceLoss:  # fmt: skip
        return preference_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta, self.loss_type, chosen_lengths, rejected_lengths
        )
