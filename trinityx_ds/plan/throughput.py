"""Step time of one training stage: compute at an assumed utilisation, plus the pipeline bubble
and the communication that compute does not hide.

FLOPs per token. The standard MFU count (Megatron, torchtitan): 6 N + 12 L H s, N the active
parameters without the input embedding (top-k experts only), 12 L H s the attention scores
(QK^T and AV, forward 4 L H s, backward twice that). What the GPUs execute differs in a MoCaE
stage: a frozen weight still needs the activation gradient through it (backward 2 N) but no
weight gradient, so 4 N for frozen parts, 6 N for trainable ones, 2 N below the lowest MoCaE
layer (no backward needed there); full activation checkpointing adds one more forward, selective
one more forward of the core attention (4 H s per token per layer, its QK^T and AV).
    compute = tokens x executed FLOPs / (GPUs x peak x assumed MFU)
The implied MFU reports the standard count over the whole step time.

Communication (ring algorithms; n ranks; busbw from `Cluster.bandwidth`, NVLink inside a node,
InfiniBand for groups that span nodes, so TP across nodes is penalised):
  TP all-reduce of s b h activations, per layer 2 forward + 2 backward (+2 recompute):
     2 (n-1)/n x bytes / busbw, on the critical path; sequence parallelism turns each into an
     all-gather plus a reduce-scatter, the same bytes, except around full MoCaE experts, which
     gather the TP group's tokens and still all-reduce inside (model/mocae.py): half an
     all-reduce more per such layer and pass
  EP all-to-all of routed tokens (dispatch + combine), forward and backward, exposed
  PP send/receive of s b h per micro-batch; bubble (pp - 1) / grad_accum of compute
  ZeRO-1: gradient all-reduce + parameter all-gather once per step; ZeRO-2: reduce-scatter per
     micro-batch + all-gather per step; both exposed (overlap_comm is off by default)
  ZeRO-3: all-gather of every partitioned weight (frozen ones too) per forward, backward and
     recompute, gradient reduce-scatter per micro-batch; prefetched, so only what exceeds
     compute is exposed
  offload: gradients down and weights up over PCIe, plus CPU Adam, per step
"""
from __future__ import annotations

from dataclasses import dataclass

from trinityx_ds.config.schema import recompute_mode
from trinityx_ds.model.arch import ModelArch
from trinityx_ds.plan.layout import Cluster, Layout, Term
from trinityx_ds.plan.params import MoCaEPlan, attention_params, ffn_params, stage_layers, stage_moe, zero_parts


# bf16 dense peak TFLOP/s per GPU (NVIDIA data sheets), by a substring of torch.cuda.get_device_name();
# first match wins, so the PCIe / NVL variants come before the SXM name they contain
PEAK_TFLOPS_BF16 = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0))


def gpu_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU by its CUDA device name; None for a GPU not in the table."""
    return next((peak for key, peak in PEAK_TFLOPS_BF16 if key in device_name), None)


@dataclass(frozen=True)
class Throughput:
    flops_per_token: float  # executed
    model_flops_per_token: float  # 6 N + 12 L H s
    tokens_per_step: int
    compute_s: float
    bubble_s: float
    comm: tuple[Term, ...]  # exposed seconds per step
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float  # implied by step_s, standard count


def flops_per_token(arch: ModelArch, moe: MoCaEPlan, stage: int, seq_len: int,
                    act_ckpt: bool | str) -> tuple[float, float]:
    """(executed, standard MFU) FLOPs per token of one training stage (module docstring);
    act_ckpt: none | full | selective (a bool: full / none)."""
    mode = recompute_mode(act_ckpt)
    full, selective = mode == "full", mode == "selective"
    H, F, L = arch.hidden_size, arch.intermediate_size, arch.num_layers
    moe = stage_moe(moe, stage, 1)[0]
    chosen, k = moe.chosen(L), moe.routed(stage)
    lowest = min(chosen, default=L)
    scores = 4 * seq_len * arch.num_heads * arch.head_dim  # forward FLOPs per token per layer
    experts_train = stage == 1 or moe.train_experts_in_stage2
    executed = model = 0.0
    for i in range(L):
        frozen, train = attention_params(arch, 1), 0
        if i in chosen:
            expert = k * (moe.lora_params(H, F) if moe.kind == "lora" else ffn_params(arch, 1))
            frozen += ffn_params(arch, 1) if moe.kind == "lora" else 0
            router = moe.router_params(H)
            train += (expert if experts_train else 0) + (router if stage == 2 else 0)
            frozen += (0 if experts_train else expert) + (0 if stage == 2 else router)
        else:
            frozen += ffn_params(arch, 1)
        if i < lowest:
            executed += 2 * frozen + scores
        else:
            executed += 4 * frozen + 6 * train + 3 * scores + full * (2 * (frozen + train) + scores) + selective * scores
        model += 6 * (frozen + train) + 3 * scores
    out = arch.hidden_size * arch.vocab_size
    return executed + 4 * out, model + 6 * out  # the output layer is outside the checkpointed layers


def _ring(n: int, nbytes: float, bw: float, allreduce: bool = False) -> float:
    return (2 if allreduce else 1) * (n - 1) / n * nbytes / bw if n > 1 else 0.0


def stage_throughput(arch: ModelArch, moe: MoCaEPlan, lay: Layout, cluster: Cluster, stage: int) -> Throughput:
    world, dp, m = cluster.world, lay.dp(cluster.world), lay.grad_accum
    executed, model = flops_per_token(arch, moe, stage, lay.seq_len, lay.act_ckpt)
    tokens = lay.seq_len * lay.micro_batch * m * dp
    compute = tokens * executed / (world * cluster.peak_tflops * 1e12 * cluster.mfu)
    bubble = compute * (lay.pp - 1) / m
    comm = max((_comm(arch, moe, lay, cluster, stage, r, compute) for r in range(lay.pp)),
               key=lambda terms: sum(t.value for t in terms))
    step = compute + bubble + sum(t.value for t in comm)
    return Throughput(executed, model, tokens, compute, bubble, comm, step, tokens / step / world,
                      tokens * model / (step * world * cluster.peak_tflops * 1e12))


def _comm(arch: ModelArch, moe: MoCaEPlan, lay: Layout, cluster: Cluster, stage: int, pp_rank: int,
          compute: float) -> tuple[Term, ...]:
    """Exposed communication per step of one pipeline stage's ranks, with the formulas' inputs."""
    dp, m = lay.dp(cluster.world), lay.grad_accum
    layers = stage_layers(arch, lay.pp, pp_rank)
    chosen = moe.chosen(arch.num_layers) & set(layers)
    act = 2 * lay.seq_len * lay.micro_batch * arch.hidden_size
    passes = 2 + (lay.act_ckpt == "full")  # selective recomputes the core attention: no collective in it
    k = moe.routed(stage) if moe.kind == "full" else 1
    out = []

    def bw(span: int) -> tuple[float, str]:
        b = cluster.bandwidth(span)
        return b, f"{b / 1e9:g} GB/s {'NVLink' if span <= cluster.gpus_per_node else 'IB'}"

    if lay.tp > 1:
        calls = passes * (2 * len(layers) + (k - 1) * len(chosen)
                          + (0.5 * len(chosen) if lay.sequence_parallel and moe.kind == "full" else 0))
        b, b_txt = bw(lay.tp)
        out.append(Term("TP all-reduce", m * calls * _ring(lay.tp, act, b, allreduce=True),
                        f"{m} micro-batches x {calls} all-reduces x 2({lay.tp}-1)/{lay.tp} x {act / 2**20:.0f} MiB "
                        f"/ {b_txt}"))
    ep = stage_moe(moe, stage, lay.ep)[1]
    if ep > 1 and moe.kind == "full":
        b, b_txt = bw(lay.tp * ep)
        out.append(Term("EP all-to-all", m * passes * 2 * len(chosen) * _ring(ep, k * act, b),
                        f"{m} x {passes} passes x 2 x {len(chosen)} layers x ({ep}-1)/{ep} x {k} x "
                        f"{act / 2**20:.0f} MiB / {b_txt}"))
    if lay.pp > 1:
        b, b_txt = bw(cluster.world)
        out.append(Term("PP send/recv", m * 2 * act / b, f"{m} x 2 x {act / 2**20:.0f} MiB / {b_txt}"))
    parts = zero_parts(arch, moe, lay.tp, lay.pp, pp_rank, lay.ep, dp, stage)
    b, b_txt = bw(lay.tp * dp)
    if lay.zero == 3:
        z3 = sum(m * (passes * _ring(d, 2 * n, b) + _ring(d, 2 * t, b)) for t, n, d in parts)
        out.append(Term("ZeRO-3 gather/reduce", max(0.0, z3 - compute),
                        f"max(0, {z3:.2f} s - compute): {m} x ({passes} gathers of 2 B x "
                        f"{sum(n for _, n, _ in parts) / 1e9:.3g}B + grads) x (d-1)/d / {b_txt}"))
    else:
        grads = sum(m * _ring(d, 2 * t, b) if lay.zero == 2 else _ring(d, 2 * t, b, allreduce=True)
                    for t, _, d in parts)
        how = f"{m} reduce-scatters" if lay.zero == 2 else "1 all-reduce"
        out.append(Term(f"ZeRO-{lay.zero} grads + params", grads + sum(_ring(d, 2 * t, b) for t, _, d in parts),
                        f"{how} + 1 all-gather of 2 B x {sum(t for t, _, _ in parts) / 1e6:.3g}M over d = {dp} "
                        f"/ {b_txt}"))
    if lay.offload:
        local = sum(t / d for t, _, d in parts)
        out.append(Term("CPU offload", 4 * local / (cluster.pcie_gbs * 1e9) + local / (cluster.cpu_adam_gparams * 1e9),
                        f"4 B x {local / 1e6:.3g}M / PCIe {cluster.pcie_gbs:g} GB/s + CPU Adam at "
                        f"{cluster.cpu_adam_gparams:g}e9 params/s"))
    return tuple(out)
