"""lm-evaluation-harness backend `trinityx`: lm-eval's tasks scored by our model (the megatron backbone
with MoCaE, any variant of eval/variants.py) at its TP, data-parallel over the job's ranks.

    trinityx lm-eval [--nproc N] --model trinityx --model_args run=RUN,variant=trinityx --tasks ...

Every process of the job runs lm-eval whole and reports rank 0 of a world of 1: lm-eval's own
sharding would hand TP ranks different requests, so the requests go through `dp_map` instead (each
DP rank its batches, every result on every rank), and lm-eval (>= 0.4.10) writes its results only
where LOCAL_RANK is 0. Tokenisation is lm-eval's TemplateLM (context and continuation encoded
together, then split; an empty context becomes the BOS token) with HFLM's special-token rule, so a
run exported with `trinityx export-hf` and scored by `--model hf` gives the same log-likelihoods.

lm-eval 0.4 knows models from its own MODEL_MAPPING or from `register_model` run at import; it reads
no entry points (and `--include_path` is for tasks only). Hence `trinityx lm-eval` and `python -m
trinityx_ds.eval.harness` (what torchrun starts): import this module, then lm-eval's own CLI.
"""
from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from trinityx_ds.data.render import render_text
from trinityx_ds.data.tokenizer import pad_id
from trinityx_ds.eval.generate import generate_batch
from trinityx_ds.eval.lm import load_lm
from trinityx_ds.eval.loglik import score_rows
from trinityx_ds.eval.shard import dp_map
from trinityx_ds.eval.variants import checkpoint_problem
from trinityx_ds.parallel.groups import destroy_parallel
from trinityx_ds.storage.layout import RunLayout


@register_model("trinityx")
class TrinityXLM(TemplateLM):
    """`--model_args run=RUN_DIR` (or a plain HF / imported folder: backbone only), `variant=` (as
    `trinityx eval --variant`), `config=`, `tp=`, `max_length=` [the run's data.max_seq_len],
    `max_gen_toks=` [256], `add_bos_token=` (as lm-eval's hf). `--batch_size` counts sequences."""

    def __init__(self, run: str | None = None, variant: str | None = None, config: str | None = None,
                 tp: int | None = None, max_length: int | None = None, batch_size: int | str = 8,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, **_ignored) -> None:
        super().__init__()
        if not run:
            raise ValueError("--model_args: run=RUN_DIR is required (a run output folder or a model folder)")
        if not str(batch_size).isdigit():
            raise ValueError(f"--batch_size {batch_size}: a number of sequences (no 'auto' with --model trinityx)")
        problem = checkpoint_problem(run, variant)
        if problem:
            raise ValueError(problem)
        variant = variant or ("trinityx" if RunLayout(run).is_run() else "backbone")
        self.lm = load_lm(run, variant, config=config, tp=int(tp) if tp else None,
                          max_len=int(max_length) if max_length else None, batch_size=int(batch_size))
        self.tokenizer = self.lm.tokenizer
        self.add_bos_token = add_bos_token
        self._max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS, else EOS (as lm-eval's hf)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.lm.max_len

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """HFLM's rule: the tokenizer's default special tokens unless told (or `add_bos_token`), none
        when the text already starts with the BOS text."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`--apply_chat_template`: the run's own rendering (its data.chat_template), as it trains."""
        return render_text(self.tokenizer, chat_history, self.lm.chat_template,
                           add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_ignored) -> list[tuple[float, bool]]:
        """(log p(continuation), greedy) per (key, context ids, continuation ids), cut on the left to
        max_length + 1 tokens as lm-eval's hf does. Collective over the job."""
        rows = []
        for _, ctx, cont in requests:
            ids = (ctx + cont)[-(self.max_length + 1):]
            rows.append((ids, min(len(cont), len(ids) - 1)))
        out = score_rows(self.lm.model, rows, pad_id(self.tokenizer), self.lm.batch_size, "lm-eval loglikelihood")
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood over lm-eval's disjoint rolling windows of max_length tokens."""
        windows, counts = [], []
        for (text,) in [r.args for r in requests]:
            mine = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(None, ctx, cont) for ctx, cont in mine]
            counts.append(len(mine))
        scores = iter(self._loglikelihood_tokens(windows))
        out = [sum(next(scores)[0] for _ in range(n)) for n in counts]
        for r, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, seeded sampling) continuations cut at the request's stop strings;
        requests with the same length and temperature share batches. Collective over the job."""
        tok, eos = self.tokenizer, self.tokenizer.decode(self.eot_token_id)
        groups: dict[tuple[int, float], list] = {}
        stops = []
        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            kw = normalize_gen_kwargs(dict(gen_kwargs), self._max_gen_toks)
            stops.append(handle_stop_sequences(kw.pop("until", None), eos=eos))
            new = kw["max_gen_toks"]
            if new >= self.max_length:
                raise ValueError(f"max_gen_toks {new}: must be below the model's max_length {self.max_length}")
            temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
            groups.setdefault((new, temperature), []).append((i, self.tok_encode(context)[-(self.max_length - new):]))
        out = [""] * len(requests)
        eos_ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        for (new, temperature), items in groups.items():
            def run(batch, new=new, temperature=temperature):  # seeded by the batch's first request
                return generate_batch(self.lm.model, [ids for _, ids in batch], max_new_tokens=new, eos_ids=eos_ids,
                                      pad=pad_id(tok), temperature=temperature, seed=batch[0][0])
            for (i, _), ids in zip(items, dp_map(items, run, self.lm.batch_size, "lm-eval generate_until")):
                out[i] = postprocess_generated_text(tok.decode(ids, skip_special_tokens=True), stops[i], None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI with the `trinityx` model registered (what `trinityx lm-eval` and torchrun run)."""
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        destroy_parallel()  # gloo aborts at exit when a group is left open
    return 0


if __name__ == "__main__":
    sys.exit(main())
