"""Request-level routing (vLLM serving one PEFT adapter per request, picked by `trinityx route`)
against TrinityX's token-level routing, on a run's held-out prompts: the pieces of
tools/route_agreement.py (whose docstring defines the two figures) and tools/gap_attribution.py
(which splits the fused model's gap to each expert by how tokens were routed).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from trinityx_ds.config import load_config
from trinityx_ds.config.schema import DataSource
from trinityx_ds.convert.hf_model import TrinityXForCausalLM
from trinityx_ds.convert.request_router import RequestRouter
from trinityx_ds.data.formats import read_source
from trinityx_ds.eval.loglik import Request, encode
from trinityx_ds.eval.metrics import bootstrap
from trinityx_ds.experiments.samples import fixture_samples, split_samples
from trinityx_ds.storage.layout import RunLayout

SUITES = (("truthfulqa", "tqa_eval", "truthfulqa"), ("hh_harmless", "hh_eval", "hh_rlhf"), ("alpaca", "alpaca_eval", "alpaca"))


def run_heldout(run: Path) -> dict[str, str] | None:
    """{split key: file} of the run's own held-out files in the three formats, or None."""
    cfg = load_config(str(RunLayout(run).run_config_file()), check_paths=False)
    files = {src.format: src.path for sources in cfg.data.heldout.values() for src in sources}
    found = {key: files[fmt] for _, key, fmt in SUITES if fmt in files}
    return found if len(found) == len(SUITES) else None


def held_out_requests(root: Path, run: Path, data: Path | None, n: int, seed: int) -> tuple[dict[str, list], str]:
    """({suite: [Request]}, where they come from): the run's held-out files, else the evaluation
    side of a prompt-disjoint split of `data` (None: the fixtures)."""
    paths = run_heldout(run)
    where = "the run's data.heldout files"
    if paths is None:
        samples = data if data is not None else fixture_samples(root / "fixture_samples")
        paths = split_samples(samples, root / "split", n, n, n, seed)
        where = f"a prompt-disjoint split of {samples} (seed {seed})"
    out = {}
    for suite, key, fmt in SUITES:
        recs, _ = read_source(DataSource(str(paths[key]), fmt, split="validation"), suite, "skip")
        out[suite] = [Request(r["messages"][:-1], r["messages"][-1]["content"]) for r in recs][:n]
    return out, where


class TokenLevel:
    """The exported TrinityX model: its routers' top-1 per token, and continuation log-likelihoods."""

    def __init__(self, folder: Path):
        self.model = TrinityXForCausalLM.from_pretrained(folder).eval()
        self.top1: list[torch.Tensor] = []
        for m in self.model.modules():
            if type(m).__name__ == "TrinityXRouter":
                m.register_forward_hook(lambda mod, args, out: self.top1.append(out[0][:, 0]))

    @torch.no_grad()
    def loglik(self, ids: list[int], n: int, force: str | None = None) -> float:
        """log p of the last n tokens of ids; `force`: every token to that expert."""
        self.model.config.force_expert = force
        self.top1.clear()
        ids_1S = torch.tensor([ids])
        logp_SV = self.model(ids_1S).logits[0, :-1].double().log_softmax(-1)
        self.model.config.force_expert = None
        return float(logp_SV[-n:].gather(1, ids_1S[0, -n:, None]).sum())

    def majority(self, n_prompt: int, num_experts: int) -> int:
        """Most frequent top-1 over the prompt's tokens and every MoCaE layer of the last forward."""
        counts = torch.bincount(torch.cat([t[:n_prompt] for t in self.top1]), minlength=num_experts)
        return int(counts.argmax())


def measure(out: Path, requests: dict[str, list], max_len: int) -> dict[str, list[dict]]:
    router = RequestRouter(out / "peft")
    tok = TokenLevel(out / "trinityx")
    items = {}
    for suite, reqs in requests.items():
        items[suite] = []
        for r in reqs:
            ids, n = encode(router.tokenizer, r, max_len)
            pick, _ = router.pick(ids[:-n])
            routed = tok.loglik(ids, n)
            majority = router.names[tok.majority(len(ids) - n, len(router.names))]
            items[suite].append({"pick": pick, "majority": majority, "n": n, "routed": routed,
                                 "request": tok.loglik(ids, n, force=pick)})
    return items


def figures(rows: list[dict], resamples: int) -> dict:
    """Agreement of the request-level pick with the token-level majority, and the per-token
    log-likelihood cost of serving the pick, each with a 95% bootstrap interval over items."""
    agree = np.array([r["pick"] == r["majority"] for r in rows], dtype=float)
    diff, n = np.array([r["request"] - r["routed"] for r in rows]), np.array([r["n"] for r in rows], dtype=float)
    routed = np.array([r["routed"] for r in rows])
    return {"items": len(rows), "tokens": int(n.sum()),
            "agreement": (agree.mean(), bootstrap(lambda i: agree[i].mean(), len(rows), resamples)),
            "ll/token routed": routed.sum() / n.sum(),
            "ll/token cost": (diff.sum() / n.sum(),
                              bootstrap(lambda i: diff[i].sum() / n[i].sum(), len(rows), resamples)),
            "picks": dict(Counter(r["pick"] for r in rows)), "majorities": dict(Counter(r["majority"] for r in rows))}
