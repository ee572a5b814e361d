"""Preference experts: DPO at TP=2 x ZeRO-3 equals TRL's DPO loss on the transformers model
carrying a PEFT LoRA adapter with the same weights and pairs, step for step, and its reference
(the expert switched off) is the backbone exactly; with sequence parallelism too."""
import re
from pathlib import Path

import pytest
import torch

from tests.train_setup import metrics
from trinityx_ds.train.tiny_run import write_config

WORKER = Path(__file__).parent / "workers" / "pref_worker.py"
pytestmark = pytest.mark.distributed
PEFT_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.mlp\.(\w+)\.lora_([AB])\.default\.weight")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from trinityx_ds.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("pref") / "model")


def _cpo_loss(model, ids, labels, attention_mask, sc) -> torch.Tensor:
    """TRL's CPOTrainer loss (loss_type sigmoid) on the PEFT model's logits: its get_batch_logps and
    cpo_loss, plus cpo_alpha x its NLL term (concatenated_forward's token-mean cross-entropy of the
    chosen half, written out: a nested function there). Rows are [chosen; rejected]."""
    from types import SimpleNamespace

    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    logits = model(input_ids=ids, attention_mask=attention_mask).logits.float()
    trl_labels = torch.full_like(ids, -100)  # TRL's labels: the token itself, shifted inside
    trl_labels[:, 1:] = torch.where(labels[:, :-1] >= 0, ids[:, 1:], -100)
    half = ids.shape[0] // 2
    logps = CPOTrainer.get_batch_logps(logits, trl_labels)
    trl_self = SimpleNamespace(alpha=0.0, beta=sc.beta, label_smoothing=sc.label_smoothing, loss_type="sigmoid",
                               accelerator=SimpleNamespace(device=logits.device))
    losses, _, _ = CPOTrainer.cpo_loss(trl_self, logps[:half], logps[half:])
    nll = torch.nn.CrossEntropyLoss()(logits[:half, :-1].reshape(-1, logits.shape[-1]), trl_labels[:half, 1:].reshape(-1))
    return losses.mean() + sc.cpo_alpha * nll


def _trl_reference(cfg_path: Path, expert: str, objective: str = "dpo") -> dict:
    """Stage 1 of `expert` as TRL trains a PEFT adapter: the same pairs in the same micro-batches,
    `DPOTrainer.compute_loss` (loss_type sigmoid, reference = adapter disabled) or CPOTrainer's loss
    (`_cpo_loss`), torch SGD with the run's schedule. Returns per-step losses, LoRA gradients and
    weights (our HF names)."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from trinityx_ds.config import load_config
    from trinityx_ds.data.dataset import Batches, build_pair_datasets, collate_pairs
    from trinityx_ds.data.tokenizer import load_tokenizer
    from trinityx_ds.model.arch import ModelArch
    from trinityx_ds.model.experts import lora_init_tensors
    from trinityx_ds.model.mocae_spec import MoCaEConfig
    from trinityx_ds.train.engine import lr_lambda

    cfg = load_config(cfg_path)
    sc, lora = cfg.train.stage1, cfg.experts.lora
    tok = load_tokenizer(cfg.model.hf_path, None)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_path, dtype=torch.float32)
    layers = None if cfg.experts.layers == "all" else list(cfg.experts.layers)
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                             target_modules=list(lora.targets), layers_to_transform=layers))
    arch = ModelArch.from_hf_dir(cfg.model.hf_path)
    init = lora_init_tensors(arch, MoCaEConfig.from_run_config(cfg).one_expert(expert), cfg.seed)

    def ours(peft_name: str) -> str:
        layer, proj, ab = PEFT_NAME.fullmatch(peft_name).groups()
        return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.lora_{ab}.weight"

    lora_params = {ours(n): p for n, p in model.named_parameters() if "lora_" in n}
    assert lora_params.keys() == init.keys()
    with torch.no_grad():
        for name, p in lora_params.items():
            p.copy_(init[name])
    args = DPOConfig(output_dir=str(cfg_path.parent / "trl"), beta=sc.beta, loss_type=["sigmoid"], report_to=[],
                     use_cpu=True, precompute_ref_log_probs=False, bf16=False)
    dummy = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok)
    model = trainer.model
    model.train()
    train, _ = build_pair_datasets(cfg.data, tok, cfg.experts.names, cfg.seed, expert)
    batches = Batches(train, sc.micro_batch * sc.grad_accum, cfg.seed, tok.pad_token_id, collate_fn=collate_pairs)
    opt = torch.optim.SGD(list(lora_params.values()), lr=sc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sc))
    out = {"losses": [], "grads": [], "weights": []}
    for _ in range(sc.steps):
        big, step_loss = next(batches), 0.0
        rows = 2 * sc.micro_batch
        for k in range(sc.grad_accum):
            b = {key: v[k * rows:(k + 1) * rows] for key, v in big.items()}
            order = torch.cat([torch.arange(0, rows, 2), torch.arange(1, rows, 2)])  # TRL: [chosen; rejected]
            ids, labels, ex = b["input_ids"][order], b["labels"][order], b["example_id"][order]
            completion = torch.zeros_like(ids)
            completion[:, 1:] = (labels[:, :-1] >= 0).long()  # labels are shifted: target of t is token t + 1
            inputs = {"input_ids": ids, "attention_mask": (ex >= 0).long(), "completion_mask": completion}
            if objective == "cpo":
                loss = _cpo_loss(model, ids, labels, inputs["attention_mask"], sc)
            else:
                loss = trainer.compute_loss(model, inputs)
            (loss / sc.grad_accum).backward()
            step_loss += loss.item() / sc.grad_accum
        out["losses"].append(step_loss)
        out["grads"].append({n: p.grad.clone() for n, p in lora_params.items()})
        opt.step()
        sched.step()
        opt.zero_grad()
        out["weights"].append({n: p.detach().clone() for n, p in lora_params.items()})
    out["lr"] = [sc.lr * lr_lambda(sc)(s) for s in range(sc.steps)]
    out["init"] = init
    return out


DPO_RUN = {"experts.objective": {"help": "sft", "harm": "dpo", "honest": "sft"},
           "parallel": {"tp": 2, "zero_stage": 3},
           "train.stage1": {"steps": 3, "lr": 0.5, "micro_batch": 2, "grad_accum": 2, "optimizer": "sgd",
                            "grad_clip": 0.0, "beta": 0.5},
           "train.checkpoint_every": 1, "train.keep_last": 3}


def test_dpo_tp2_zero3_equals_trl_dpo_on_a_peft_adapter(run_dist, tmp_path, model_dir):
    from trinityx_ds.storage.layout import CheckpointDir
    from trinityx_ds.storage.universal_copy import open_universal

    cfg = write_config(tmp_path, model_dir, **DPO_RUN)
    got = run_dist(WORKER, 2, str(cfg), "harm", timeout=240)
    assert got["zero_stage"] == 3 and got["summary"]["step"] == 3
    # the reference policy is the backbone itself, bit for bit, while the trained expert is not
    assert got["ref_equals_backbone"], got["ref_vs_backbone_max"]
    assert got["expert_moved"] > 1e-4

    ref = _trl_reference(cfg, "harm")
    logged = metrics(tmp_path / "out/stage1/harm/metrics.jsonl")
    losses = [m["dpo/loss"] for m in logged]
    assert abs(losses[0] - 0.693147) < 1e-5  # B = 0: policy == reference, loss = ln 2
    assert max(abs(a - b) for a, b in zip(losses, ref["losses"])) <= 1e-5, (losses, ref["losses"])
    assert ref["losses"][-1] < ref["losses"][0]
    assert {"dpo/reward_accuracy", "dpo/reward_margin", "dpo/logps_chosen", "dpo/logps_rejected"} <= logged[-1].keys()

    ckpt = CheckpointDir(tmp_path / "out/stage1/harm/checkpoints")
    before, worst = ref["init"], 0.0
    for step in range(3):  # each step's weights from its checkpoint's universal copy; gradient = dW / lr
        src = open_universal(ckpt.tag_dir(f"step{step + 1:08d}"))
        after = {n: src.read(n) for n in before}
        for n in before:
            grad = (before[n] - after[n]) / ref["lr"][step]
            assert torch.allclose(after[n], ref["weights"][step][n], atol=1e-5, rtol=0), (step, n)
            assert torch.allclose(grad, ref["grads"][step][n], atol=1e-5, rtol=0), \
                (step, n, float((grad - ref["grads"][step][n]).abs().max()))
            worst = max(worst, float((grad - ref["grads"][step][n]).abs().max()))
        before = after
    print(f"DPO vs TRL: loss max diff {max(abs(a - b) for a, b in zip(losses, ref['losses'])):.2e}, "
          f"LoRA gradient max diff {worst:.2e}")
    assert any(float(g.abs().max()) > 1e-3 for g in ref["grads"][1].values())  # the gradients are not trivial

    # the same run with sequence parallelism (the reference forward and the LoRA paths on sharded
    # tokens): the same losses and, step by step, the same weights as TRL's
    sp_cfg = write_config(tmp_path / "sp", model_dir, **DPO_RUN, **{"model.sequence_parallel": True})
    sp = run_dist(WORKER, 2, str(sp_cfg), "harm", timeout=240)
    assert sp["sequence_parallel"] and all(sp["sequence_parallel"]) and sp["summary"]["step"] == 3
    assert sp["ref_vs_backbone_max"] <= 1e-5 and sp["expert_moved"] > 1e-4, sp
    sp_losses = [m["dpo/loss"] for m in metrics(tmp_path / "sp/out/stage1/harm/metrics.jsonl")]
    assert max(abs(a - b) for a, b in zip(sp_losses, ref["losses"])) <= 1e-5, (sp_losses, ref["losses"])
    sp_ckpt = CheckpointDir(tmp_path / "sp/out/stage1/harm/checkpoints")
    for step in range(3):
        src = open_universal(sp_ckpt.tag_dir(f"step{step + 1:08d}"))
        for n, w in ref["weights"][step].items():
            assert torch.allclose(src.read(n), w, atol=1e-5, rtol=0), (step, n)


def test_dpo_above_layer_0_shares_the_reference_prefix_and_still_equals_trl(run_dist, tmp_path, model_dir):
    """Experts on layer 1 only: each micro-batch's policy forward starts from the hidden state its
    reference forward reached at layer 1 (train/step.ReferencePrefix), at TP=2 with ZeRO-3, and the
    losses and every step's weights still equal TRL's DPO on a PEFT adapter on layer 1."""
    from trinityx_ds.storage.layout import CheckpointDir
    from trinityx_ds.storage.universal_copy import open_universal

    cfg = write_config(tmp_path, model_dir, **DPO_RUN, **{"experts.layers": [1]})
    got = run_dist(WORKER, 2, str(cfg), "harm", timeout=240)
    assert got["summary"]["step"] == 3 and got["zero_stage"] == 3
    assert got["prefix"] == {"first": 1, "shared": 3 * DPO_RUN["train.stage1"]["grad_accum"]}, got["prefix"]
    assert got["ref_equals_backbone"] and got["expert_moved"] > 1e-4, got
    ref = _trl_reference(cfg, "harm")
    losses = [m["dpo/loss"] for m in metrics(tmp_path / "out/stage1/harm/metrics.jsonl")]
    assert max(abs(a - b) for a, b in zip(losses, ref["losses"])) <= 1e-5, (losses, ref["losses"])
    assert ref["losses"][-1] < ref["losses"][0]
    ckpt = CheckpointDir(tmp_path / "out/stage1/harm/checkpoints")
    for step in range(3):
        src = open_universal(ckpt.tag_dir(f"step{step + 1:08d}"))
        for n, w in ref["weights"][step].items():
            assert torch.allclose(src.read(n), w, atol=1e-5, rtol=0), (step, n)


def test_cpo_tp2_zero3_equals_trl_cpo_on_a_peft_adapter(run_dist, tmp_path, model_dir):
    """CPO (no reference, an NLL term over the vocab-parallel logits) at TP=2 x ZeRO-3: TRL's
    CPOTrainer loss on the PEFT model, step for step: losses and weights."""
    from trinityx_ds.storage.layout import CheckpointDir
    from trinityx_ds.storage.universal_copy import open_universal

    run = {**DPO_RUN, "experts.objective": {"help": "sft", "harm": "cpo", "honest": "sft"},
           "train.stage1": {**DPO_RUN["train.stage1"], "cpo_alpha": 0.5, "beta": 0.2}}
    cfg = write_config(tmp_path, model_dir, **run)
    got = run_dist(WORKER, 2, str(cfg), "harm", timeout=240)
    assert got["zero_stage"] == 3 and got["summary"]["step"] == 3 and got["expert_moved"] > 1e-4
    ref = _trl_reference(cfg, "harm", objective="cpo")
    logged = metrics(tmp_path / "out/stage1/harm/metrics.jsonl")
    losses = [m["cpo/loss"] for m in logged]
    assert max(abs(a - b) for a, b in zip(losses, ref["losses"])) <= 1e-5, (losses, ref["losses"])
    assert "time/reference_s" not in logged[-1]  # no reference forward
    ckpt = CheckpointDir(tmp_path / "out/stage1/harm/checkpoints")
    for step in range(3):
        src = open_universal(ckpt.tag_dir(f"step{step + 1:08d}"))
        for n, w in ref["weights"][step].items():
            assert torch.allclose(src.read(n), w, atol=1e-5, rtol=0), (step, n)
    assert any(float(g.abs().max()) > 1e-3 for g in ref["grads"][1].values())
