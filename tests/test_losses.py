"""Each loss term against values worked out by hand, plus the properties the engine relies on."""

from __future__ import annotations

import math

import pytest
import torch

from model import losses as L

LN3 = math.log(3.0)


def test_next_token_targets_shift_labels_by_one():
    labels = torch.tensor([[-100, -100, 5, 6]])
    mask, targets = L.next_token_targets(labels)
    # Position 1 predicts token 5 and position 2 predicts 6; the last position predicts nothing.
    assert mask.tolist() == [[False, True, True, False]]
    assert targets.tolist() == [[-100, 5, 6, -100]]


def test_forward_kl_by_hand():
    # p_t = softmax([0, 0]) = [1/2, 1/2]; p_s = softmax([0, ln 3]) = [1/4, 3/4]
    # KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.1438410
    kl = L.forward_kl(torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]]))
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    # T = 2: p_s = softmax([0, ln3 / 2]) = [1/(1+sqrt3), sqrt3/(1+sqrt3)]; times T^2 = 4
    # KL = 4 * (ln((1+sqrt3)/2) - ln(3)/4) = 4 * (0.3119054 - 0.2746531) = 0.1490091
    kl_t2 = L.forward_kl(torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]]), temperature=2.0)
    assert kl_t2.item() == pytest.approx(0.1490091, abs=1e-6)
    assert L.forward_kl(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]])).item() == pytest.approx(0.0, abs=1e-7)


def response_means(hidden, head, targets, teacher, temperature=1.0, chunk_size=1024):
    """ce and kl_response as the engine computes them: one chunked projection for both row terms."""
    return L.chunked_row_means(
        hidden, head, [(L.CrossEntropy(), lambda part: targets[part]), (L.ResponseKL(temperature), lambda part: teacher[part])], chunk_size
    )


def test_chunked_row_terms_by_hand_and_chunking_is_exact():
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    # Hidden rows are the logits themselves (identity head): student [0, ln3], teacher [0, 0].
    hidden = torch.tensor([[0.0, LN3], [0.0, LN3]], requires_grad=True)
    ce, kl = response_means(hidden, head, torch.tensor([1, 0]), torch.zeros(2, 2), chunk_size=1)
    # ce = mean(-ln 3/4, -ln 1/4) = (0.2876821 + 1.3862944) / 2 = 0.8369882
    assert ce.item() == pytest.approx(0.8369882, abs=1e-6)
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)

    torch.manual_seed(0)
    hidden = torch.randn(7, 8, requires_grad=True)
    teacher = torch.randn(7, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    t_head = torch.nn.Linear(8, 11, bias=False)
    targets = torch.randint(0, 11, (7,))
    grads = []
    values = []
    for chunk in (2, 100):
        hidden.grad = None
        with torch.no_grad():
            t_logits = t_head(teacher)
        ce, kl = response_means(hidden, head, targets, t_logits, temperature=2.0, chunk_size=chunk)
        (ce + kl).backward()
        grads.append(hidden.grad.clone())
        values.append((ce.item(), kl.item()))
    assert values[0] == pytest.approx(values[1], abs=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    # And the same as the plain, unchunked formulas.
    logits = head(hidden)
    assert values[0][0] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), abs=1e-6)
    assert values[0][1] == pytest.approx(L.forward_kl(logits, t_head(teacher), 2.0).mean().item(), abs=1e-6)


def test_losses_are_zero_when_nothing_is_unmasked():
    head = torch.nn.Linear(4, 5)
    empty = torch.zeros(0, 4, requires_grad=True)
    ce, kl = response_means(empty, head, torch.zeros(0, dtype=torch.long), torch.zeros(0, 5))
    assert ce.item() == 0.0 and kl.item() == 0.0
    ce.backward()  # still part of the graph
    assert L.visual_kl(torch.zeros(0, 5), torch.zeros(0, 5)).item() == 0.0
    assert L.relation_distillation(torch.zeros(0, 3, 5), torch.zeros(0, 3, 5)).item() == 0.0
    assert L.sequence_logprobs(torch.zeros(1, 3, 5), torch.full((1, 3), -100)).item() == 0.0


def test_visual_kl_is_the_mean_over_visual_tokens():
    student = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])  # [B=1, Nv=2, V=2]
    teacher = torch.zeros(1, 2, 2)
    # token 0: 1/2 ln(4/3); token 1: 0  -> mean 1/4 ln(4/3) = 0.0719205
    assert L.visual_kl(student, teacher).item() == pytest.approx(0.25 * math.log(4 / 3), abs=1e-6)


def test_relation_distillation_by_hand():
    # R_s = I (flattened [1, 0, 0, 1]); R_t = all ones ([1, 1, 1, 1]).
    # cos = 2 / (sqrt(2) * 2) = 0.7071068 -> loss = 0.2928932
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert L.relation_distillation(student, teacher).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    # Scaling the student's tokens does not change its relations.
    assert L.relation_distillation(3 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_load_balancing_by_hand():
    # E = 2, top-1. Tokens routed one to each expert with probs [1/4, 3/4] and [3/4, 1/4]:
    # f = [1/2, 1/2], P = [1/2, 1/2] -> L = 2 * (1/4 + 1/4) = 1.0
    balanced = torch.tensor([[0.0, LN3], [LN3, 0.0]])
    assert L.load_balancing_loss([balanced], top_k=1).item() == pytest.approx(1.0, abs=1e-6)
    # Both to expert 1: f = [0, 1], P = [1/4, 3/4] -> L = 2 * 3/4 = 1.5
    skewed = torch.tensor([[0.0, LN3], [0.0, LN3]])
    assert L.load_balancing_loss([skewed], top_k=1).item() == pytest.approx(1.5, abs=1e-6)
    # A padded row is left out: only the first (balanced-looking) token counts.
    # f = [0, 1], P = [1/4, 3/4] -> 1.5 again for the single token [0, ln3].
    masked = L.load_balancing_loss([balanced], top_k=1, token_mask=torch.tensor([[1, 0]]))
    assert masked.item() == pytest.approx(1.5, abs=1e-6)


def test_sequence_logprobs_by_hand():
    logits = torch.zeros(1, 3, 2)  # uniform: every token has log-prob ln(1/2)
    labels = torch.tensor([[-100, 1, 0]])  # two response tokens, predicted from positions 0 and 1
    assert L.sequence_logprobs(logits, labels).item() == pytest.approx(-2 * math.log(2), abs=1e-6)
    logits[0, 0] = torch.tensor([0.0, LN3])  # position 0 now gives token 1 probability 3/4
    assert L.sequence_logprobs(logits, labels).item() == pytest.approx(math.log(0.75) + math.log(0.5), abs=1e-6)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        # h = (-1 - -2) - (-3 - -2) = 2, beta = 0.5: -log sigmoid(1) = log(1 + e^-1) = 0.3132617
        ("sigmoid", 0.3132617),
        # r_w = 1, r_l = -1, z_w = 1, z_l = 0: (1 - sigmoid(0.5) + 1 - sigmoid(1)) / 2 = (0.3775407 + 0.2689414) / 2
        ("kto_pair", 0.3232411),
    ],
)
def test_preference_losses_by_hand(loss_type, expected):
    t = torch.tensor
    out = L.preference_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5, loss_type=loss_type)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.5) and out.rejected_rewards.item() == pytest.approx(-0.5)


def test_ipo_is_on_length_normalised_log_probs():
    t = torch.tensor
    # Chosen: 4 tokens, log-probs -4 (policy) / -8 (reference) -> per token -1 / -2, ratio +1.
    # Rejected: 2 tokens, -6 / -4 -> -3 / -2, ratio -1. h = 2; beta = 0.5: (2 - 1)^2 = 1.
    out = L.preference_loss(t([-4.0]), t([-6.0]), t([-8.0]), t([-4.0]), beta=0.5, loss_type="ipo", chosen_lengths=t([4]), rejected_lengths=t([2]))
    assert out.losses.item() == pytest.approx(1.0, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.5) and out.rejected_rewards.item() == pytest.approx(-0.5)
    # Summed, the same pair would give h = 4 - -2 = 6 and (6 - 1)^2 = 25: the target 1/(2 beta) would mean nothing.
    with pytest.raises(ValueError, match="ipo needs chosen_lengths"):
        L.preference_loss(t([-4.0]), t([-6.0]), t([-8.0]), t([-4.0]), beta=0.5, loss_type="ipo")


def test_kto_pair_gradient_flows_through_the_kl_estimates_as_in_trl():
    t = torch.tensor
    beta = 0.5
    chosen = t([-1.0], requires_grad=True)
    rejected = t([-3.0], requires_grad=True)
    L.preference_loss(chosen, rejected, t([-2.0]), t([-2.0]), beta=beta, loss_type="kto_pair").losses.sum().backward()
    # r_w = 1 (z_w = 1, it depends on r_w), r_l = -1 (z_l = 0, clamped: no gradient).
    # loss = (1 - s(b (r_w - 0)) + 1 - s(b (r_w - r_l))) / 2, so
    # d/dr_w = -(b s'(b) + b s'(2b)) / 2 and d/dr_l = b s'(2b) / 2, with s' = s (1 - s).
    ds = lambda x: torch.sigmoid(t(x)) * (1 - torch.sigmoid(t(x)))  # noqa: E731
    assert chosen.grad.item() == pytest.approx((-(beta * ds(beta) + beta * ds(2 * beta)) / 2).item(), abs=1e-6)  # detached z_w: -b s'(b) / 2
    assert rejected.grad.item() == pytest.approx((beta * ds(2 * beta) / 2).item(), abs=1e-6)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        L.forward_kl(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        L.ResponseKL(temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        L.RouterBalance(top_k=0)
    with pytest.raises(ValueError, match="beta"):
        L.DPOLoss(beta=0)
    with pytest.raises(ValueError, match="loss_type"):
        L.DPOLoss(beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        L.preference_loss(*[torch.zeros(1)] * 4, beta=0)
    with pytest.raises(ValueError, match="loss_type"):
        L.preference_loss(*[torch.zeros(1)] * 4, beta=0.1, loss_type="hinge")


def _topk_of(probs: list[float], k: int) -> L.TopK:
    logp = torch.log(torch.tensor([probs]))
    top = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, top.indices, float("-inf"))
    return L.TopK(top.indices, top.values, torch.logsumexp(rest, dim=-1))


def test_sparse_kl_by_hand_is_a_divergence_below_the_exact_kl():
    # p_t = [0.5, 0.3, 0.1, 0.1], p_s = [0.25, 0.25, 0.4, 0.1]; top-2 buckets {0}, {1}, tail {2, 3}:
    # 0.5 ln(0.5/0.25) + 0.3 ln(0.3/0.25) + 0.2 ln(0.2/0.5) = 0.3465736 + 0.0546965 - 0.1832581 = 0.2180120
    # exact: 0.3465736 + 0.0546965 + 0.1 ln(0.1/0.4) + 0.1 ln(1) = 0.2626407
    student = torch.log(torch.tensor([[0.25, 0.25, 0.4, 0.1]]))
    teacher = _topk_of([0.5, 0.3, 0.1, 0.1], k=2)
    assert L.sparse_forward_kl(student, teacher).item() == pytest.approx(0.2180120, abs=1e-6)
    exact = L.forward_kl(student, torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]])))
    assert exact.item() == pytest.approx(0.2626407, abs=1e-6)
    # A student with the teacher's top-k and tail masses is at zero, however it spreads the tail.
    matched = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert L.sparse_forward_kl(matched, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_sparse_kl_with_the_whole_vocabulary_is_the_exact_kl_and_truncation_folds_into_the_tail():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    logp = torch.log_softmax(teacher, dim=-1)
    top = logp.topk(11, dim=-1)
    full = L.TopK(top.indices, top.values, torch.full((5,), float("-inf")))
    for temperature in (1.0, 2.0):
        exact = L.forward_kl(student, teacher, temperature)
        assert torch.allclose(L.sparse_forward_kl(student, full, temperature), exact, atol=1e-5)
    # top-11 cut to 4 = top-4 computed directly (the dropped tokens' mass joins the tail)
    four = logp.topk(4, dim=-1)
    direct = L.TopK(four.indices, four.values, torch.logsumexp(logp.scatter(-1, four.indices, float("-inf")), dim=-1))
    cut = full.truncate(4)
    assert torch.equal(cut.ids, direct.ids)
    assert torch.allclose(cut.tail, direct.tail, atol=1e-6)
    assert torch.allclose(L.sparse_forward_kl(student, cut), L.sparse_forward_kl(student, direct), atol=1e-6)
    assert (L.sparse_forward_kl(student, cut) <= L.forward_kl(student, teacher) + 1e-6).all()


def test_row_terms_read_cached_top_k_like_live_logits():
    torch.manual_seed(1)
    hidden = torch.randn(7, 8, requires_grad=True)
    head, t_head = torch.nn.Linear(8, 11, bias=False), torch.nn.Linear(8, 11, bias=False)
    teacher_hidden, targets = torch.randn(7, 8), torch.randint(0, 11, (7,))
    with torch.no_grad():
        logp = torch.log_softmax(t_head(teacher_hidden), dim=-1)
    top = logp.topk(11, dim=-1)
    cached = L.TopK(top.indices, top.values, torch.full((7,), float("-inf")))
    with torch.no_grad():
        t_logits = t_head(teacher_hidden)
    live = response_means(hidden, head, targets, t_logits, chunk_size=3)
    read = response_means(hidden, head, targets, cached, chunk_size=3)
    assert read[1].item() == pytest.approx(live[1].item(), rel=1e-5)
    assert read[0].item() == pytest.approx(live[0].item(), rel=1e-6)


def test_chunked_relation_equals_the_full_logit_relation_and_its_gradient():
    torch.manual_seed(2)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 13, bias=True)
    teacher_visual = torch.randn(2, 5, 13)
    full = L.relation_distillation(head(hidden), teacher_visual)
    (grad_full,) = torch.autograd.grad(full, hidden)
    t = teacher_visual
    # chunk_size 1 -> blocks of one vocabulary column: thirteen blocks summed
    chunked = L.relation_loss(L.chunked_relation(hidden, head, chunk_size=1), (t @ t.transpose(1, 2)).flatten(1))
    (grad_chunked,) = torch.autograd.grad(chunked, hidden)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(grad_chunked, grad_full, atol=1e-6)


def test_chunked_sequence_logprobs_equal_the_full_logit_sums_and_gradient():
    torch.manual_seed(3)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[-100, -100, 4, 5, -100, -100], [-100, 1, 2, 3, 4, -100], [-100] * 6])
    full = L.sequence_logprobs(head(hidden), labels)
    chunked = L.chunked_sequence_logprobs(hidden, head, labels, chunk_size=2)
    assert torch.allclose(chunked, full, atol=1e-6) and chunked[2].item() == 0.0
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    (g_chunked,) = torch.autograd.grad(L.chunked_sequence_logprobs(hidden, head, labels, chunk_size=2).sum(), hidden)
    assert torch.allclose(g_chunked, g_full, atol=1e-6)


def test_the_modules_compute_their_formulas():
    """Each term module is its formula with the hyper-parameters it was built with."""
    torch.manual_seed(2)
    student, teacher, targets = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 6, (4,))
    assert L.CrossEntropy()(student, targets).item() == pytest.approx(torch.nn.functional.cross_entropy(student, targets, reduction="sum").item(), rel=1e-6)
    assert L.ResponseKL(2.0)(student, teacher).item() == pytest.approx(L.forward_kl(student, teacher, 2.0).sum().item(), rel=1e-6)
    assert L.VisualKL(1.0)(student.view(2, 2, 6).reshape(-1, 6), teacher).item() / 4 == pytest.approx(
        L.visual_kl(student.view(2, 2, 6), teacher.view(2, 2, 6)).item(), rel=1e-6
    )
    s, t = torch.randn(2, 9), torch.randn(2, 9)
    assert L.RelationKD()(s, t).item() == pytest.approx(L.relation_loss(s, t).item())
    routed = [torch.randn(5, 4), torch.randn(5, 4)]
    assert L.RouterBalance(2)(routed).item() == pytest.approx(L.load_balancing_loss(routed, 2).item())
    one = torch.tensor
    out = L.DPOLoss(0.5, "ipo")(one([-4.0]), one([-6.0]), one([-8.0]), one([-4.0]), one([4]), one([2]))
    expected = L.preference_loss(one([-4.0]), one([-6.0]), one([-8.0]), one([-4.0]), 0.5, "ipo", one([4]), one([2]))
    assert out.losses.item() == pytest.approx(expected.losses.item())
