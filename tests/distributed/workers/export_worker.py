"""Worker for the export tests. argv: MODE ...

build TINY RUN OPTS   (torchrun) a MoCaE model at OPTS' TP/EP from seeded HF-space tensors; writes
                      RUN as a training output dir (stage-1 expert files, stage-2 router file,
                      config.yaml, gathered from the model's own shards) and RUN/reference.pt.
rebuild RUN           (torchrun) the model of a trained run, read as StageRun reads it, plus the
                      router of stage 2; writes RUN/reference.pt.
train CONFIG FORCE    (torchrun) stage 2 of CONFIG as `trinityx train router` runs it; then the
                      live training model (ZeRO partitions, TP shards, EP-placed experts as
                      trained) writes OUT/reference.pt, OUT = the config's output.dir.
pipeline CONFIG FORCE (torchrun) stage 1 (every expert) then stage 2 of CONFIG in one job, as the
                      two `trinityx train` commands run them; then, like `train`, the live stage-2
                      model writes OUT/reference.pt.
hf FOLDER REF OPTS    (plain python, HF_HUB_OFFLINE) loads FOLDER with AutoModelForCausalLM, as
                      a user would: registered through `import trinityx_ds`, or with
                      trust_remote_code in a process that never imports trinityx_ds; prints the
                      largest logit differences from REF as JSON.
reference.pt: ids, "routed" (the configured top-k), "dense" (every expert) and "forced" (every
token to expert `force`) logits.
"""
import json
import sys

mode = sys.argv[1]

if mode == "hf":
    import os

    folder, ref_path = sys.argv[2], sys.argv[3]
    opt = json.loads(sys.argv[4])
    if not opt.get("remote"):
        import trinityx_ds  # noqa: F401
        from trinityx_ds.convert.register import install

        install()  # a no-op once trinityx_ds/__init__.py installs it
    import torch
    from transformers import AutoModelForCausalLM

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    ref = torch.load(ref_path, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=bool(opt.get("remote"))).eval()
    out = {"class": type(model).__name__, "trinityx_ds_imported": "trinityx_ds" in sys.modules}
    with torch.no_grad():
        if opt.get("dense_of") is not None:  # a plain model: one expert merged
            out["forced"] = (model(ref["ids"]).logits - ref["forced"]).abs().max().item()
        else:
            out["routed"] = (model(ref["ids"]).logits - ref["routed"]).abs().max().item()
            routers = [m for m in model.modules() if type(m).__name__ == "TrinityXRouter"]
            for r in routers:
                r.top_k = len(model.config.mocae["expert_names"])
            out["dense"] = (model(ref["ids"]).logits - ref["dense"]).abs().max().item()
            for r in routers:
                r.top_k = model.config.mocae["top_k"]
            model.config.force_expert = int(ref["force"])
            out["forced"] = (model(ref["ids"]).logits - ref["forced"]).abs().max().item()
            model.config.force_expert = None
        gen = model.generate(ref["ids"][:1, :5], max_new_tokens=4, do_sample=False)
        out["generated"] = gen.shape[1] - 5
    print("RESULT " + json.dumps(out))
    sys.exit(0)

from tests.dist import worker_setup, write_result  # noqa: E402

worker_setup()

import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from trinityx_ds.model.build import build_model  # noqa: E402
from trinityx_ds.model.mocae import RoutingContext, set_routing_context  # noqa: E402
from trinityx_ds.model.weights import load_weights  # noqa: E402
from trinityx_ds.parallel.groups import destroy_parallel, init_parallel  # noqa: E402


def references(model, blocks, arch, force: int, forward=None) -> dict:
    """`forward` (default `model.logits`): the live engine for a ZeRO-3 run, whose forward gathers
    what a tied output layer reads from the embedding (called outside it, ZeRO-3 has released it)."""
    ids = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(11))
    out = {"ids": ids, "force": torch.tensor(force)}
    forward = forward or model.logits
    with torch.no_grad():
        out["routed"] = forward(ids)
        top_k = [b.router.top_k for b in blocks]
        for b in blocks:
            b.router.top_k = b.router.num_experts
        out["dense"] = forward(ids)
        for b, k in zip(blocks, top_k):
            b.router.top_k = k
        set_routing_context(blocks, RoutingContext(force_expert=force, compute_losses=False))
        out["forced"] = forward(ids)
        set_routing_context(blocks, None)
    return out


def build(tiny: str, run: Path, opt: dict) -> None:
    from safetensors.torch import save_file

    from trinityx_ds.model.arch import ModelArch
    from trinityx_ds.model.mocae import MoCaEConfig
    from trinityx_ds.model.tiny import mocae_source
    from trinityx_ds.train.gather import gather_mocae_tensors
    from trinityx_ds.train.tiny_run import FIXTURES, write_config

    dims = init_parallel(tp=opt["tp"], ep=opt.get("ep", 1), seed=5)
    arch = ModelArch.from_hf_dir(tiny)
    names = [f"e{i}" for i in range(opt["experts"])]
    router = {"top_k": opt["top_k"], "importance": opt.get("importance"), "normalize_output": opt.get("norm", False)}
    cfg = MoCaEConfig(kind=opt["kind"], expert_names=names, lora_rank=4, lora_alpha=8.0, **router)
    model, blocks = build_model(arch, dims, cfg)
    assert load_weights(model, mocae_source(tiny, cfg, seed=2), arch, dims.tp, dims.tp_rank, moe_cfg=cfg) == []
    ref = references(model, blocks, arch, opt["force"])
    parts = (".mlp.router.", ".mlp.experts.", ".mlp.post_norm.")
    tensors = gather_mocae_tensors(model, cfg, arch, dims,
                                   lambda n: any(p in n for p in parts) and not n.endswith("_extra_state"))
    if dims.rank == 0:
        for n in names:
            (run / "stage1" / n).mkdir(parents=True)
            mine = {k: v for k, v in tensors.items() if f".experts.{n}." in k}
            save_file(mine, str(run / "stage1" / n / "expert.safetensors"))
        (run / "stage2").mkdir()
        router_file = run / "stage2" / "router.safetensors"
        save_file({k: v for k, v in tensors.items() if ".experts." not in k}, str(router_file))
        write_config(run, Path(tiny), experts={"names": names, "kind": opt["kind"], "lora": {"rank": 4, "alpha": 8.0}},
                     router=router, output={"dir": str(run)},
                     data={"tasks": {n: [{"path": str(FIXTURES / "alpaca_tiny.jsonl")}] for n in names}})
        torch.save(ref, run / "reference.pt")
    write_result({"n_tensors": len(tensors)})


def rebuild(run: Path) -> None:
    """The trained run as StageRun loads it, with stage 2's router file on top."""
    from trinityx_ds.config import load_config
    from trinityx_ds.model.mocae import MoCaEConfig
    from trinityx_ds.model.weights import open_source
    from trinityx_ds.storage.layout import expert_file, latest_tag
    from trinityx_ds.storage.sources import ChainSource, SafetensorsSource

    ckpt = run / "stage2" / "checkpoints"
    cfg = load_config(str(ckpt / latest_tag(ckpt) / "config.yaml"), check_paths=False)
    dims = init_parallel(tp=int(os.environ["WORLD_SIZE"]), seed=5)
    moe = MoCaEConfig.from_run_config(cfg)
    arch, backbone = open_source(cfg.model.checkpoint or cfg.model.hf_path)
    files = [run / "stage2" / "router.safetensors"] + [expert_file(cfg, n) for n in moe.expert_names]
    src = ChainSource([SafetensorsSource.from_file(f) for f in files] + [backbone])
    model, blocks = build_model(arch, dims, moe)
    assert load_weights(model, src, arch, dims.tp, dims.tp_rank, moe_cfg=moe) == []
    ref = references(model, blocks, arch, force=1)
    if dims.rank == 0:
        torch.save(ref, run / "reference.pt")
    write_result({})


def train(config: str, force: int) -> None:
    from trinityx_ds.config import load_config
    from trinityx_ds.train.stages import StageRun

    run = StageRun(load_config(config), 2)
    summary = run.run()
    run.model.eval()
    ref = references(run.model, run.blocks, run.arch, force, forward=run.engine)
    if run.dims.rank == 0:
        torch.save(ref, Path(run.cfg.output.dir) / "reference.pt")
    write_result({"step": summary["step"]})


def pipeline(config: str, force: int) -> None:
    from trinityx_ds.config import load_config
    from trinityx_ds.train.stages import StageRun

    cfg = load_config(config)
    steps = {name: StageRun(cfg, 1, name).run()["step"] for name in cfg.experts.names}
    train(config, force)  # stage 2 reads the stage-1 files just written (StageRun ends on a barrier)
    write_result({"stage1_steps": steps})


if mode == "build":
    build(sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4]))
elif mode == "train":
    train(sys.argv[2], int(sys.argv[3]))
elif mode == "pipeline":
    pipeline(sys.argv[2], int(sys.argv[3]))
else:
    rebuild(Path(sys.argv[2]))
destroy_parallel()
