"""Backbone parity: our megatron model (at this run's TP) against transformers on the same weights.

Run under torchrun (`python -m trinityx_ds.eval.parity MODEL_DIR...`, or `run_parity`, which
starts it and prints the table: `trinityx parity`, the demo): the demo and the tests use it to
show that import, TP sharding and the megatron -> HF mapping are exact.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from transformers import AutoModelForCausalLM

from trinityx_ds.errors import one_line_errors
from trinityx_ds.launch.torchrun import cpu_env, launch_torchrun
from trinityx_ds.model.backbone import build_backbone, masked_mean_loss
from trinityx_ds.model.llama_adapter import LlamaAdapter
from trinityx_ds.model.weights import META, check_model_folders, load_weights, open_source, read_meta
from trinityx_ds.parallel.groups import init_parallel

TOL = 1e-4
SEQ_LEN = 24


def parity_ok(r: dict) -> bool:
    """The verdict on one `backbone_parity` result.

    Logits, loss and re-mapped logits must agree with transformers to TOL, or, for deep real
    models, to transformers' own fp32 rounding error on the same input (its fp32 logits against
    its fp64 logits): no fp32 implementation can be asked to agree more closely than that.
    SmolLM2-135M (30 layers, logits up to 34) differs from transformers by 1.6e-4 at TP=2 while
    transformers' own fp32 logits are 2.5e-4 away from fp64.
    """
    tol = max(TOL, r["ref_fp32_error"])
    return (r["logits"] <= tol and r["loss"] <= tol and r["mapped_logits"] <= tol
            and r["emb_grad"] <= tol * max(1.0, r["emb_grad_scale"]) and r["padded_rows_grad"] == 0.0
            and not r["missing"] and not r["unexpected"] and r["mapped_exact"])


def backbone_parity(folder: str, tp: int, tp_rank: int, seq_len: int = SEQ_LEN) -> dict:
    """Max abs differences of logits, loss, input-embedding gradient and re-mapped logits."""
    arch, src = open_source(folder)
    model = build_backbone(arch, tp=tp, init_weights=False)
    foreign = load_weights(model, src, arch, tp, tp_rank)
    assert not foreign, f"parameters without a source: {foreign}"
    # the reference is the HF folder itself, or the one an imported checkpoint was made from
    ref_dir = read_meta(folder)["source"] if (Path(folder) / META).is_file() else folder
    ids = torch.randint(0, arch.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(7))
    pad = json.loads((Path(ref_dir) / "config.json").read_text()).get("pad_token_id")
    if isinstance(pad, int) and 0 <= pad < arch.vocab_size:
        ids[1, seq_len // 2] = pad  # its embedding row is compared apart (below): always exercise it
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[0, :5] = -100  # prompt tokens carry no loss

    logits = model.logits(ids)
    loss = masked_mean_loss(model.token_losses(ids, labels), labels)
    loss.backward()
    emb_grad = model.embedding.word_embeddings.weight.grad  # this rank's (padded) vocab rows
    rows = emb_grad.shape[0]
    lo, hi = tp_rank * rows, min((tp_rank + 1) * rows, arch.vocab_size)

    # megatron -> HF: every rank's shards gathered, mapped back, loaded into a fresh transformers model
    shards = [None] * tp
    dist.all_gather_object(shards, {k: v.detach().cpu() for k, v in model.state_dict().items() if torch.is_tensor(v)},
                           group=parallel_state.get_tensor_model_parallel_group())
    adapter = LlamaAdapter(arch, tp)
    mapped = dict(adapter.unshard(lambda r, n: shards[r][n]))

    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    ref_logits = ref(ids).logits
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, arch.vocab_size), labels.reshape(-1))
    ref_loss.backward()
    ref_emb_grad = ref.get_input_embeddings().weight.grad[lo:hi]
    # transformers builds the input embedding with padding_idx = pad_token_id (Gemma's config says
    # 0), and torch's embedding gives that row no gradient from the input; megatron's embedding has
    # no padding row. So that row is left out of the comparison: the other rows must agree.
    keep = torch.ones(hi - lo, dtype=torch.bool, device=emb_grad.device)
    padding_idx = ref.get_input_embeddings().padding_idx
    if padding_idx is not None and lo <= padding_idx < hi:
        keep[padding_idx - lo] = False

    fresh = AutoModelForCausalLM.from_config(ref.config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(mapped, strict=False)
    missing = [m for m in missing if not (arch.tie_word_embeddings and m == "lm_head.weight")]
    with torch.no_grad():
        mapped_logits = fresh(ids).logits
    # bit for bit, or for Gemma's norms the same (1 + w) multiplier (what the fold keeps: llama_adapter)
    mapped_exact = all(adapter.hf_equal(k, mapped[k], v) for k, v in ref.state_dict().items() if k in mapped)
    with torch.no_grad():  # transformers' own fp32 rounding error: the floor any fp32 parity can reach
        ref_fp32_error = (ref_logits.double() - ref.double()(ids).logits).abs().max().item()
    return {
        "model": str(folder), "tp": tp, "params": sum(p.numel() for p in ref.parameters()),
        "logits": (logits - ref_logits).abs().max().item(),
        "logits_scale": ref_logits.abs().max().item(),
        "ref_fp32_error": ref_fp32_error,
        "loss": abs(loss.item() - ref_loss.item()),
        "emb_grad": (emb_grad[: hi - lo] - ref_emb_grad)[keep].abs().max().item(),
        "emb_grad_rows_left_out": (~keep).nonzero().flatten().add(lo).tolist(),  # transformers' padding_idx
        "emb_grad_scale": ref_emb_grad.abs().max().item(),
        "padded_rows_grad": emb_grad[hi - lo:].abs().max().item() if hi - lo < rows else 0.0,
        "mapped_logits": (mapped_logits - ref_logits).abs().max().item(),
        "missing": missing, "unexpected": list(unexpected),
        "mapped_exact": mapped_exact,
    }


def run_parity(models: list[str], tp: int, timeout: float = 900) -> list[dict]:
    """Runs `trinityx_ds.eval.parity` under torchrun on `tp` local processes and prints a table.
    A model it cannot check is refused here, in one line, before torchrun starts."""
    check_model_folders(models, tp, SEQ_LEN, key="parity sequence length")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "parity.json"
        proc = launch_torchrun(["-m", "trinityx_ds.eval.parity", str(tp), str(out), *models], tp, timeout,
                               env=cpu_env())
        if proc.returncode != 0:
            raise RuntimeError(f"parity run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
        results = json.loads(out.read_text())
    print(f"{'model':<40} {'TP':>2} {'params':>12} {'max|dlogits|':>12} {'|dloss|':>10} {'max|dgrad_emb|':>14} "
          f"{'HF-mapped':>10} {'HF fp32 err':>11}")
    for r in results:
        r["ok"] = parity_ok(r)
        print(f"{Path(r['model']).name[:40]:<40} {r['tp']:>2} {r['params']:>12,} {r['logits']:>12.2e} "
              f"{r['loss']:>10.2e} {r['emb_grad']:>14.2e} {r['mapped_logits']:>10.2e} {r['ref_fp32_error']:>11.2e}  {'OK' if r['ok'] else 'FAIL'}")
    return results


def main(argv: list[str]) -> int:
    """torchrun entry: argv = [tp, result_json_path_or_-, folder...]; rank 0 writes the results.
    A model it cannot check: one line on every rank, exit 2, before the process group."""
    return one_line_errors("parity", lambda: _main(argv))


def _main(argv: list[str]) -> int:
    tp, out, folders = int(argv[0]), argv[1], argv[2:]
    check_model_folders(folders, tp, SEQ_LEN, key="parity sequence length")
    dims = init_parallel(tp=tp)
    results = [backbone_parity(f, dims.tp, dims.tp_rank) for f in folders]
    if dims.rank == 0:
        text = json.dumps(results, indent=2)
        if out == "-":
            print(text)
        else:
            with open(out, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
