"""One evaluated model on this rank: a variant of a run (or a plain HF model) built with megatron,
with the three things the suites ask of it, each data-parallel over the job: continuation
log-likelihoods, generations, and per-example routing statistics."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trinityx_ds.config import load_config
from trinityx_ds.data.dataset import collate
from trinityx_ds.data.render import render_text
from trinityx_ds.data.tokenizer import load_tokenizer, pad_id
from trinityx_ds.eval import variants
from trinityx_ds.eval.generate import generate_batch
from trinityx_ds.eval.loglik import Request, sequence_logprobs
from trinityx_ds.eval.shard import dp_map
from trinityx_ds.model.assemble import assemble, expert_sources, router_source
from trinityx_ds.model.mocae import RoutingContext, set_routing_context
from trinityx_ds.model.mocae_spec import MoCaEConfig
from trinityx_ds.model.weights import open_source
from trinityx_ds.parallel.groups import init_parallel
from trinityx_ds.storage.layout import RunLayout
from trinityx_ds.storage.sources import DictSource


@dataclass
class EvalLM:
    model: torch.nn.Module
    blocks: list
    tokenizer: object
    arch: object
    dims: object
    variant: str
    moe: object | None  # the variant's MoCaEConfig
    cfg: object | None  # the run's RunConfig (None for a plain model)
    layout: RunLayout | None  # where the run's files are (None for a plain model)
    chat_template: str
    max_len: int
    batch_size: int = 8

    def logprobs(self, requests: list[Request], desc: str = "loglik") -> list[float]:
        return sequence_logprobs(self.model, self.tokenizer, requests, max_len=self.max_len,
                                 batch_size=self.batch_size, chat_template=self.chat_template, desc=desc)

    def generate(self, prompts: list[list[dict]], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        """Text of each prompt's answer (prompts rendered as in loglik, cut on the left when prompt and
        answer would not fit the model's positions)."""

        tok, keep = self.tokenizer, max(self.arch.max_position_embeddings - max_new_tokens, 1)
        items = [(i, tok(render_text(tok, p, self.chat_template, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"][-keep:]) for i, p in enumerate(prompts)]
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()

        def run(batch):  # seeded by the batch's first item: the same draws for any DP layout
            return generate_batch(self.model, [ids for _, ids in batch], max_new_tokens=max_new_tokens, eos_ids=eos,
                                  pad=pad_id(tok), temperature=temperature, seed=seed + batch[0][0])

        new = dp_map(items, run, self.batch_size, "generate")
        return [tok.decode(ids, skip_special_tokens=True).strip() for ids in new]

    def routing(self, rows: list[dict]) -> list[dict]:
        """Per held-out example (rows of `build_task_datasets`): its router logits and probabilities
        averaged over its response tokens, per layer ([L, E] each), and per-layer top-1 counts."""

        device = self.model.embedding.word_embeddings.weight.device

        @torch.no_grad()
        def run(batch):
            b = collate(batch, pad_id(self.tokenizer))
            ctx = RoutingContext.from_batch(b["labels"].to(device), compute_losses=False, keep_probs=True)
            before = [blk.ctx for blk in self.blocks]
            set_routing_context(self.blocks, ctx)
            self.model(b["input_ids"].to(device), b["labels"].to(device))
            for blk, c in zip(self.blocks, before):
                blk.ctx = c
            B, S = b["labels"].shape
            mask_BS1 = (b["labels"] >= 0).unsqueeze(-1).double()
            n_B1 = mask_BS1.sum(1).clamp(min=1)
            z, p, top1 = [], [], []
            for layer in sorted(ctx.records):  # records are in megatron's [S, B] token order
                rec = ctx.records[layer]
                z_BSE = rec["logits_TE"].cpu().double().reshape(S, B, -1).transpose(0, 1)
                p_BSE = rec["probs_TE"].cpu().double().reshape(S, B, -1).transpose(0, 1)
                onehot_BSE = torch.nn.functional.one_hot(p_BSE.argmax(-1), p_BSE.shape[-1]).double()
                z.append((z_BSE * mask_BS1).sum(1) / n_B1)
                p.append((p_BSE * mask_BS1).sum(1) / n_B1)
                top1.append((onehot_BSE * mask_BS1).sum(1))
            z_BLE, p_BLE, t_BLE = (torch.stack(x, 1) for x in (z, p, top1))
            return [{"logits_LE": z_BLE[i].tolist(), "probs_LE": p_BLE[i].tolist(), "top1_LE": t_BLE[i].tolist()}
                    for i in range(B)]

        return dp_map(rows, run, self.batch_size, "routing")

    def router_state(self) -> tuple[list[int], list[float], list[list[float]]]:
        """(layer ids, each router's T, each router's log-priors) as the model uses them now."""
        return ([b.layer_id for b in self.blocks], [b.router.temperature for b in self.blocks],
                [b.router.log_importance.tolist() for b in self.blocks])


def load_lm(checkpoint: str, variant: str, *, config: str | None = None, tp: int | None = None,
            max_len: int | None = None, batch_size: int = 8) -> EvalLM:
    """Builds `variant` of a run folder (or a plain HF/imported model: backbone only) on this rank;
    initialises the process groups (TP from the run config unless `tp` is given)."""

    layout = RunLayout(checkpoint) if RunLayout(checkpoint).is_run() else None
    cfg = None
    if layout is not None:
        cfg = load_config(str(config or layout.run_config_file()), check_paths=False)
        model_path = cfg.model.checkpoint or cfg.model.hf_path
    else:
        model_path = checkpoint
    moe = variants.variant_config(MoCaEConfig.from_run_config(cfg) if cfg else None, variant)
    arch, backbone_src = open_source(model_path)
    ep = cfg.parallel.ep if moe is not None and moe.kind == "full" and moe.num_experts % cfg.parallel.ep == 0 else 1
    dims = init_parallel(tp=tp or (cfg.parallel.tp if cfg else 1), ep=ep, seed=cfg.seed if cfg else 1234)
    sources = [DictSource(variants.router_overrides(moe, variant, arch.num_layers, arch.hidden_size)), backbone_src]
    if moe is not None:
        sources += expert_sources(layout, arch, moe, cfg.train.train_experts_in_stage2)
        routed = not variant.startswith("expert:")
        sources += router_source(layout, required=variant in ("h3fusion", "trinityx")) if routed else []
    model, blocks = assemble(arch, dims, moe, sources, where=checkpoint, dtype=cfg.model.dtype if cfg else "fp32",
                             attention=cfg.model.attention if cfg else "sdpa")
    model.eval()
    if variant.startswith("expert:"):  # as in stage 1: every token to the one expert
        set_routing_context(blocks, RoutingContext(force_expert=0, compute_losses=False))
    tok = load_tokenizer(model_path, cfg.model.tokenizer if cfg else None)
    default_len = cfg.data.max_seq_len if cfg else min(arch.max_position_embeddings, 1024)
    return EvalLM(model, blocks, tok, arch, dims, variant, moe, cfg, layout,
                  cfg.data.chat_template if cfg else "auto", max_len or default_len, batch_size)
