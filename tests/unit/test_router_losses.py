"""Router regularisers against hand-computed values, masking, all-masked batches and the EMA."""

import math

import pytest
import torch

from trinityx_ds.config.schema import RouterLossConfig
from trinityx_ds.model.router import RouterOutput
from trinityx_ds.model.router_losses import (
    RoutingEMA,
    entropy_loss,
    kl_prev_loss,
    kl_uniform_loss,
    load_balance_loss,
    mean_probs,
    router_losses,
    task_ce_loss,
    z_loss,
)

LN = math.log
P_TE = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
MASK_T = torch.tensor([True, True, False])  # the last row must not count


def h(*p):
    return -sum(x * LN(x) for x in p if x > 0)


def close(value, expected):
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_uniform_probs():
    p_TE = torch.full((5, 4), 0.25)
    close(entropy_loss(p_TE, None), LN(4))
    close(kl_uniform_loss(p_TE, None), 0.0)
    close(load_balance_loss(p_TE, torch.tensor([[0], [0], [1], [3], [3]]), None), 1.0)


def test_entropy_with_mask():
    close(entropy_loss(P_TE, MASK_T), (h(0.5, 0.5) + h(0.2, 0.3, 0.5)) / 2)
    close(entropy_loss(P_TE, None), (h(0.5, 0.5) + h(0.2, 0.3, 0.5) + h(0.9, 0.05, 0.05)) / 3)


def test_kl_uniform_is_on_the_batch_mean():
    # decisive tokens that balance each other: the mean is uniform, so no penalty
    close(kl_uniform_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), None), 0.0)
    close(kl_uniform_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), None), LN(2))
    pbar = [0.35, 0.4, 0.25]
    close(kl_uniform_loss(P_TE, MASK_T), sum(p * LN(p * 3) for p in pbar))
    torch.testing.assert_close(mean_probs(P_TE, MASK_T), torch.tensor(pbar))


def test_kl_prev():
    close(kl_prev_loss(torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])), 0.5 * LN(2) + 0.5 * LN(2 / 3))
    close(kl_prev_loss(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])), 0.0)


def test_task_ce_groups_tokens_by_example():
    p_TE = torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8],
                         [0.3, 0.3, 0.4], [0.5, 0.25, 0.25], [0.9, 0.05, 0.05]])
    example_T = torch.tensor([0, 0, 1, 2, 3, -1])  # last token: padding, id -1
    mask_T = torch.tensor([True, True, True, True, False, False])
    label_N = torch.tensor([0, 2, -1, 1])  # ex 2 has no label, ex 3 only masked tokens
    # ex 0: mean (0.4, 0.2, 0.4), label 0; ex 1: (0.1, 0.1, 0.8), label 2
    close(task_ce_loss(p_TE, mask_T, example_T, label_N), (-LN(0.4) - LN(0.8)) / 2)


def test_load_balance_hand_value():
    idx_TK = torch.tensor([[0, 1], [2, 1], [0, 2]])
    # valid rows 0, 1: f = (1, 2, 1) / 4, P = (0.35, 0.4, 0.25)
    close(load_balance_loss(P_TE, idx_TK, MASK_T), 3 * (0.25 * 0.35 + 0.5 * 0.4 + 0.25 * 0.25))


def test_z_loss():
    logits_TE = torch.tensor([[0.0, 0.0], [LN(3), 0.0], [50.0, 0.0]])
    close(z_loss(logits_TE, MASK_T), (LN(2) ** 2 + LN(4) ** 2) / 2)


def test_all_masked_batch_gives_zero_without_nan():
    logits_TE = torch.randn(4, 3, requires_grad=True)
    out = RouterOutput(logits_TE, logits_TE.softmax(-1), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1))
    none_T = torch.zeros(4, dtype=torch.bool)
    ema = RoutingEMA(1, 3)
    ema.update(0, torch.tensor([0.2, 0.3, 0.5]))
    weights = RouterLossConfig(load_balance=0.1, z_loss=0.1)
    terms = router_losses(out, none_T, torch.zeros(4, dtype=torch.long), torch.tensor([1]), weights, ema, 0)
    for name, value in terms.items():
        assert value.item() == 0.0, name
    terms["total"].backward()
    assert torch.isfinite(logits_TE.grad).all()
    assert ema.updates_L.tolist() == [1]  # an empty batch does not move the EMA


def test_zero_probability_has_finite_gradient():
    logits_TE = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    p_TE = logits_TE.softmax(-1)
    assert p_TE[0, 1] == 0
    (entropy_loss(p_TE, None) + kl_uniform_loss(p_TE, None)).backward()
    assert torch.isfinite(logits_TE.grad).all()


def test_router_losses_total_first_step_and_logging_terms():
    torch.manual_seed(0)
    logits_TE = torch.randn(6, 3, requires_grad=True)
    probs_TE = logits_TE.softmax(-1)
    out = RouterOutput(logits_TE, probs_TE, probs_TE.argmax(-1, keepdim=True), torch.ones(6, 1))
    mask_T = torch.ones(6, dtype=torch.bool)
    example_T, label_N = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 2])
    ema, weights = RoutingEMA(2, 3, decay=0.5), RouterLossConfig()

    first = router_losses(out, mask_T, example_T, label_N, weights, ema, layer=1)
    assert first["kl_prev"].item() == 0.0  # no EMA yet
    torch.testing.assert_close(ema.ema_LE[1], probs_TE.mean(0).detach())
    assert ema.updates_L.tolist() == [0, 1]

    second = router_losses(out, mask_T, example_T, label_N, weights, ema, layer=1)
    close(second["kl_prev"], 0.0)  # same batch as the EMA
    expected = sum(getattr(weights, n) * second[n] for n in ("entropy", "kl_prev", "kl_uniform", "task_ce"))
    torch.testing.assert_close(second["total"], expected)
    close(second["entropy"], entropy_loss(probs_TE, None).item())
    close(second["task_ce"], task_ce_loss(probs_TE, None, example_T, label_N).item())
    # weight 0: logged, not trained on
    assert second["load_balance"].item() > 0 and second["load_balance"].grad_fn is None
    assert second["z_loss"].item() > 0 and second["z_loss"].grad_fn is None
    assert second["entropy"].grad_fn is not None

    no_ema = router_losses(out, mask_T, None, None, weights, None, layer=0)
    assert no_ema["kl_prev"].item() == 0.0 and no_ema["task_ce"].item() == 0.0


def test_ema_update_and_state_dict_round_trip():
    ema = RoutingEMA(2, 2, decay=0.75)
    ema.update(0, torch.tensor([1.0, 0.0]))
    ema.update(0, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ema.ema_LE, torch.tensor([[0.75, 0.25], [0.0, 0.0]]))

    resumed = RoutingEMA(2, 2, decay=0.75)
    resumed.load_state_dict(ema.state_dict())
    for run in (ema, resumed):
        run.update(0, torch.tensor([0.5, 0.5]))
        run.update(1, torch.tensor([0.2, 0.8]))
    assert torch.equal(resumed.ema_LE, ema.ema_LE) and torch.equal(resumed.updates_L, ema.updates_L)
    assert resumed.updates_L.tolist() == [3, 1]
    prev_E, has_prev = resumed.prev(1)
    assert has_prev.item() and torch.equal(prev_E, torch.tensor([0.2, 0.8]))


def test_task_tokens_all_counts_the_prompt_for_task_ce_only():
    """router.losses.task_tokens: "all" averages an example's routing over its prompt too (not its
    padding); every other router loss keeps the response mask."""
    from dataclasses import replace

    from trinityx_ds.model.mocae import RoutingContext

    # one row, 4 tokens: 2 prompt tokens routed to expert 1, 1 response token to expert 0, 1 padding
    p_TE = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.0, 0.0, 1.0]])
    labels_BS = torch.tensor([[-100, -100, 5, -100]])
    example_BS = torch.tensor([[0, 0, 0, -1]])
    label_N = torch.tensor([0])
    ctx = RoutingContext.from_batch(labels_BS, example_BS, label_N)
    out = RouterOutput(p_TE.log(), p_TE, p_TE.argmax(-1, keepdim=True), torch.ones(4, 1))
    response = RouterLossConfig()
    every = replace(response, task_tokens="all")
    a = router_losses(out, ctx.mask_T, ctx.example_id_T, label_N, response, None, 0)
    b = router_losses(out, ctx.mask_T, ctx.example_id_T, label_N, every, None, 0)
    close(a["task_ce"], -LN(0.8))  # the response token alone
    close(b["task_ce"], -LN((0.1 + 0.1 + 0.8) / 3))  # prompt and response, not the padding
    for k in ("entropy", "kl_uniform", "load_balance"):
        close(b[k], a[k].item())


def test_task_level_token_scores_every_token_and_weighs_examples_equally():
    """router.losses.task_level: "token" is the mean over labelled examples of the mean over their
    valid tokens of -log p_t[label]; "example" is -log of the mean routing (hand values)."""
    from dataclasses import replace

    from trinityx_ds.model.mocae import RoutingContext

    # example 0 (label 0): two response tokens at p 0.9 and 0.3 on expert 0; example 1 (label 2):
    # one response token at 0.6 on expert 2, one prompt token; example 2 unlabelled; then padding
    p_TE = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1],
                         [0.1, 0.1, 0.8], [0.0, 0.0, 1.0]])
    labels_BS = torch.tensor([[5, 5, 5, -100, 5, -100]])
    example_BS = torch.tensor([[0, 0, 1, 1, 2, -1]])
    label_N = torch.tensor([0, 2, -1])
    ctx = RoutingContext.from_batch(labels_BS, example_BS, label_N)
    out = RouterOutput(p_TE.log(), p_TE, p_TE.argmax(-1, keepdim=True), torch.ones(6, 1))
    example = RouterLossConfig()
    token = replace(example, task_level="token")
    a = router_losses(out, ctx.mask_T, ctx.example_id_T, label_N, example, None, 0)
    b = router_losses(out, ctx.mask_T, ctx.example_id_T, label_N, token, None, 0)
    close(a["task_ce"], (-LN((0.9 + 0.3) / 2) - LN(0.6)) / 2)
    close(b["task_ce"], ((-LN(0.9) - LN(0.3)) / 2 - LN(0.6)) / 2)
    every = router_losses(out, ctx.mask_T, ctx.example_id_T, label_N, replace(token, task_tokens="all"), None, 0)
    close(every["task_ce"], ((-LN(0.9) - LN(0.3)) / 2 + (-LN(0.6) - LN(0.1)) / 2) / 2)  # the prompt token too
    # both: (response term + prompt term) / 2; only example 1 has a prompt token (p 0.1 on its expert);
    # example 2 is unlabelled and the last token is padding
    both = router_losses(out, ctx.mask_T, ctx.example_id_T, label_N, replace(token, task_tokens="both"), None, 0)
    close(both["task_ce"], (b["task_ce"].item() - LN(0.1)) / 2)
    both_ex = router_losses(out, ctx.mask_T, ctx.example_id_T, label_N, replace(example, task_tokens="both"), None, 0)
    close(both_ex["task_ce"], (a["task_ce"].item() - LN(0.1)) / 2)
    no_prompt = RoutingContext.from_batch(torch.tensor([[5, 5, 5, 5, 5, -100]]), example_BS, label_N)
    alone = router_losses(out, no_prompt.mask_T, no_prompt.example_id_T, label_N, replace(token, task_tokens="both"),
                          None, 0)
    close(alone["task_ce"], router_losses(out, no_prompt.mask_T, no_prompt.example_id_T, label_N, token,
                                          None, 0)["task_ce"].item())  # no prompt token: the response term alone
    for k in ("entropy", "kl_uniform", "load_balance"):
        close(b[k], a[k].item())
