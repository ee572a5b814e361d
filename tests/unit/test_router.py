"""CalibratedRouter: calibrated probabilities, top-k choice and weights, temperature modes, fp32."""

import math

import pytest
import torch

from trinityx_ds.model.router import CalibratedRouter

# 3 experts over H=2; z = h @ W^T
W_EH = [[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]
H_TH = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]]
Z_TE = [[1.0, 0.0, -1.0], [0.0, 2.0, 2.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
GAMMA = [1.0, 2.0, 1.0]


def make(**kw) -> CalibratedRouter:
    router = CalibratedRouter(2, 3, **kw)
    with torch.no_grad():
        router.weight.copy_(torch.tensor(W_EH))
    return router


def hand_probs(temperature: float, gamma=GAMMA) -> torch.Tensor:
    rows = []
    for z in Z_TE:
        e = [g * math.exp(zi / temperature) for zi, g in zip(z, gamma)]
        rows.append([v / sum(e) for v in e])
    return torch.tensor(rows)


def test_probs_are_tempered_softmax_with_log_priors():
    out = make(temperature=0.5, importance=GAMMA)(torch.tensor(H_TH))
    torch.testing.assert_close(out.logits_TE, torch.tensor(Z_TE))
    torch.testing.assert_close(out.probs_TE, hand_probs(0.5))


def test_zero_init_routes_by_priors_alone():
    out = CalibratedRouter(2, 3, importance=GAMMA)(torch.randn(5, 2))
    torch.testing.assert_close(out.probs_TE, torch.tensor([[0.25, 0.5, 0.25]]).expand(5, 3))


def test_top1_and_top2_choice_and_weights():
    p = hand_probs(1.0)
    # by hand from Z_TE with gamma 1,2,1: row 1 ties experts 1 and 2 in z, gamma 2 favours 1;
    # row 2 ties 0 and 1 in z, gamma favours 1; row 3 is z-neutral, gamma favours 1 then 0 (tie 0/2)
    top2 = torch.tensor([[0, 1], [1, 2], [1, 0], [1, 0]])
    for k in (1, 2):
        idx = top2[:, :k]
        chosen = p.gather(1, idx)
        raw = make(temperature=1.0, importance=GAMMA, top_k=k, renormalize=False)(torch.tensor(H_TH))
        assert torch.equal(raw.topk_idx_TK, idx) and raw.topk_idx_TK.dtype == torch.long
        torch.testing.assert_close(raw.topk_weight_TK, chosen)
        norm = make(temperature=1.0, importance=GAMMA, top_k=k)(torch.tensor(H_TH))
        assert torch.equal(norm.topk_idx_TK, idx)
        torch.testing.assert_close(norm.topk_weight_TK, chosen / chosen.sum(1, keepdim=True))
    torch.testing.assert_close(norm.topk_weight_TK.sum(1), torch.ones(4))


def test_ties_go_to_the_lowest_index():
    # zero-init router with equal priors: every expert ties; torch.topk would not pick 0, 1
    out = CalibratedRouter(4, 5, top_k=2)(torch.randn(3, 4))
    assert torch.equal(out.topk_idx_TK, torch.tensor([[0, 1]] * 3))


@pytest.mark.parametrize("top_k", [3, "all"])
def test_dense_routing_uses_every_expert(top_k):
    out = make(temperature=1.0, importance=GAMMA, top_k=top_k, renormalize=False)(torch.tensor(H_TH))
    assert out.topk_idx_TK.shape == (4, 3)
    assert torch.equal(out.topk_idx_TK.sort(1).values, torch.arange(3).expand(4, 3))
    torch.testing.assert_close(out.topk_weight_TK.sum(1), torch.ones(4))


@pytest.mark.parametrize("mode", ["fixed", "learnable", "fitted"])
def test_only_learnable_temperature_gets_a_gradient(mode):
    router = make(temperature=0.7, temperature_mode=mode)
    assert router.log_temperature.shape == (1,)
    is_param = any(p is router.log_temperature for p in router.parameters())
    assert is_param == (mode == "learnable")
    out = router(torch.tensor(H_TH))
    (out.probs_TE[:, 0] ** 2).sum().backward()
    assert router.weight.grad is not None
    if mode == "learnable":
        assert router.log_temperature.grad is not None and router.log_temperature.grad.abs().item() > 0
    else:
        assert router.log_temperature.grad is None


def test_set_temperature_changes_probs():
    router = make(temperature=0.7, temperature_mode="fitted", importance=GAMMA)
    router.set_temperature(2.0)
    assert router.temperature == pytest.approx(2.0)
    torch.testing.assert_close(router(torch.tensor(H_TH)).probs_TE, hand_probs(2.0))
    assert "log_temperature" in router.state_dict()


def test_router_stays_fp32_with_bf16_model_and_input():
    router = make(temperature_mode="learnable", bias=True).bfloat16()
    for name, t in [*router.named_parameters(), *router.named_buffers()]:
        assert t.dtype == torch.float32, name
    out = router(torch.tensor(H_TH, dtype=torch.bfloat16))
    assert out.logits_TE.dtype == out.probs_TE.dtype == out.topk_weight_TK.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router(torch.tensor(H_TH)).logits_TE.dtype == torch.float32


def test_init_std_and_leading_dims():
    router = CalibratedRouter(8, 3, init_std=0.02, top_k=2)
    assert router.weight.std().item() > 0
    out = router(torch.randn(2, 5, 8))
    assert out.probs_TE.shape == (10, 3) and out.topk_idx_TK.shape == (10, 2)


@pytest.mark.parametrize("kw", [{"top_k": 4}, {"top_k": 0}, {"temperature": 0.0},
                                {"importance": [1.0, 0.0, 1.0]}, {"importance": [1.0]},
                                {"temperature_mode": "auto"}])
def test_bad_arguments_are_refused(kw):
    with pytest.raises(ValueError):
        CalibratedRouter(2, 3, **kw)


def test_routing_report_token_accuracy_counts_each_response_token_top1(tmp_path):
    """Stage 2's validation reports, per task, the share of an example's response tokens (averaged
    over layers) whose top-1 is the task's expert, beside the accuracy of the example's mean
    routing: a mean can pick the right expert while a third of the tokens go elsewhere."""
    import json
    from types import SimpleNamespace

    from trinityx_ds.train.validate import routing_report

    # one help example: 4 tokens, 3 of them response tokens (labels are shifted by collate: the
    # last position is never a target); layer A routes responses 0, 0, 1; layer B 0, 0, 0
    rows = {"input_ids": [[5, 6, 7, 8]], "labels": [[-100, 6, 7, 8]], "example_id": [0], "task_id": [0]}

    class Held(list):
        def __getitem__(self, s):
            return {k: v[s] for k, v in rows.items()}

    held = Held([0])
    probs_layers = [torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]),
                    torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.8, 0.2], [0.6, 0.4]])]
    blocks = [SimpleNamespace(ctx=None)]

    def engine(input_ids, labels):
        for layer, p in enumerate(probs_layers):
            blocks[0].ctx.records[layer] = {"probs_TE": p, "logits_TE": p.log()}

    model = SimpleNamespace(eval=lambda: None, train=lambda: None)
    report = routing_report(engine, model, blocks, {"help": held, "harm": Held([])}, ["help", "harm"],
                            micro_batch=1, pad_id=0, out_file=tmp_path / "v.json")
    # response positions after the shift: 0, 1, 2 (targets 6, 7, 8)
    mean_help = ((0.2 + 0.9 + 0.6) / 3 + (0.5 + 0.7 + 0.8) / 3) / 2
    assert report["per_task_accuracy"] == {"help": 0.0 if mean_help < 0.5 else 1.0}
    # layer A: token 0 -> expert 1, tokens 1, 2 -> 0: 2/3; layer B: 0.5 is a tie (argmax: the first), 0, 0: 3/3
    assert abs(report["per_task_token_accuracy"]["help"] - (2 / 3 + 1) / 2) < 1e-6
    assert json.loads((tmp_path / "v.json").read_text())["per_task_token_accuracy"] == report["per_task_token_accuracy"]
