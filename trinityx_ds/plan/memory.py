"""GPU memory of one training stage, term by term, each with the formula and inputs it came from.

Model states (DeepSpeed 0.19.8, bf16 mixed precision, Adam; P_t trainable params of the rank,
d its ZeRO partition group: DP, or DP/EP for full experts):
  weights     2 B/param. The frozen backbone is part of the DeepSpeed engine, so ZeRO-3
              partitions it over d like the trainable weights; ZeRO-1/2 replicate all weights.
  gradients   trainable only. ZeRO-1: full bf16 (2 P_t) + fp32 partition (4 P_t/d); ZeRO-2: bf16 +
              fp32 partitions (6 P_t/d), DeepSpeed's "2_grads_16bit + 4_grads_32bit"; ZeRO-3: the
              fp32 partition (4 P_t/d). ZeRO-3 reduce-scatters straight into its partition (bf16
              by default) and makes the fp32 copy at step time, when activations are gone: 4 B
              bounds the backward-time 2 B from above. Offload keeps only ZeRO-1's bf16 grads.
  optimizer   fp32 master + Adam m + v = 12 P_t/d; on the CPU with offload.
The frozen bf16 weights plus these terms give DeepSpeed's own count (estimate_zero*_mem_needs:
18 B per trainable param = 2 + 4 + 12) for a fully trainable model.
"""
from __future__ import annotations

from dataclasses import dataclass

from trinityx_ds.model.arch import ModelArch, padded_vocab_size
from trinityx_ds.plan.layout import GIB, Cluster, Layout, Term, ZeroBuffers
from trinityx_ds.plan.params import MoCaEPlan, largest_module, stage_layers, stage_moe, zero_parts


@dataclass(frozen=True)
class Memory:
    """One pipeline stage's GPU memory (the worst stage, when a plan reports one)."""

    pp_rank: int
    terms: tuple[Term, ...]
    capacity: float
    cpu_bytes_per_node: float  # offloaded optimizer states and fp32 gradients

    @property
    def total(self) -> float:
        return sum(t.value for t in self.terms)

    @property
    def over(self) -> float:
        return self.total - self.capacity

    @property
    def fits(self) -> bool:
        return self.over <= 0

    @property
    def dominant(self) -> Term:
        return max(self.terms, key=lambda t: t.value)

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)


def model_states(trainable: int, frozen: int, d: int, zero: int, offload: bool) -> dict[str, float]:
    """Bytes per GPU for params partitioned over a group of d ranks (formulas: module docstring)."""
    shard = d if zero == 3 else 1
    grads = {1: 2 * trainable + 4 * trainable / d, 2: 6 * trainable / d, 3: 4 * trainable / d}[zero]
    return {
        "weights (frozen)": 2 * frozen / shard,
        "weights (trainable)": 2 * trainable / shard,
        "gradients": (2 * trainable if zero == 1 else 0) if offload else grads,
        "optimizer states": 0 if offload else 12 * trainable / d,
        "cpu": 16 * trainable / d if offload else 0,
    }


def zero3_gathered(largest: int, zb: ZeroBuffers = ZeroBuffers()) -> float:
    """The module being computed plus what is in flight behind it: 2 B (L + max(prefetch, L))."""
    return 2 * (largest + max(zb.prefetch_bucket_size, largest))


def layer_activations(arch: ModelArch, lay: Layout, moe: MoCaEPlan, stage: int, mocae: bool,
                      scores: bool | None = None) -> float:
    """Bytes one decoder layer keeps for backward, one micro-batch.

    Korthikanti et al. 2022 (sec. 4) count 34 s b h + 5 a s^2 b for a GPT layer (GeLU MLP of 4h,
    dropout). The same count for the layer this project builds (t = TP, bf16):
      8 s b h      inputs of both RMSNorms, linear_qkv and linear_fc1 (over t with sequence parallel)
      8 s b h_q/t  Q, K and V after GQA expansion, linear_proj input      (fused: 4 s b (h_q + h_kv)/t)
      6 a s^2 b/t  softmax output in fp32 and its bf16 copy (no dropout)   (fused: none)
    "fused" is sdpa / te (no scores kept), and eager under selective recomputation: megatron's
    checkpoint keeps the core attention's inputs Q, K, V (K/V before GQA expansion, which eager
    does inside) and linear_proj keeps its output, exactly the fused kernels' count.
      8 s b F/t    SwiGLU: fc1 output (gate|up), silu(gate), fc2 input
    MoCaE layers replace the FFN term: LoRA experts keep gate, up, silu and product per routed
    expert plus the mixture, (8k + 2) s b F/t; full experts keep per routed expert the dispatched
    input and its receive buffer and a whole SwiGLU, k (4 s b h + 8 s b F/t); k = 1 in stage 1.
    """
    s, b, t = lay.seq_len, lay.micro_batch, lay.tp
    h, F, heads = arch.hidden_size, arch.intermediate_size, arch.padded_heads(t)
    hq, hkv = heads * arch.head_dim, arch.padded_kv_heads(t) * arch.head_dim
    sp = t if lay.sequence_parallel else 1
    if lay.scores_kept if scores is None else scores:
        attn = (8 * s * b * hq + 6 * heads * s * s * b) / t
    else:
        attn = 4 * s * b * (hq + hkv) / t
    k = moe.routed(stage)
    if not mocae:
        ffn = 8 * s * b * F / t
    elif moe.kind == "lora":
        ffn = (8 * k + 2) * s * b * F / t
    else:
        ffn = k * (4 * s * b * h + 8 * s * b * F / t)
    return 8 * s * b * h / sp + attn + ffn


def activations(arch: ModelArch, lay: Layout, moe: MoCaEPlan, stage: int, pp_rank: int) -> tuple[float, str]:
    """Activation bytes of one pipeline stage and the formula's inputs.

    1F1B keeps min(pp - rank, grad_accum) micro-batches in flight. Full checkpointing (uniform,
    1 layer) keeps each layer's input (2 s b h, over t with SP) plus one recomputed layer. The
    backward of a layer forms gradients shaped like what it saved: one more layer on top.
    Selective checkpointing (eager only) keeps every layer without its scores; the layer in
    backward recomputes them, so that one layer counts whole.
    """
    layers = stage_layers(arch, lay.pp, pp_rank)
    chosen = moe.chosen(arch.num_layers)
    per_layer = [layer_activations(arch, lay, moe, stage, i in chosen) for i in layers]
    inflight, top = min(lay.pp - pp_rank, lay.grad_accum), max(per_layer)
    shape = (f"s {lay.seq_len}, b {lay.micro_batch}, h {arch.hidden_size}, F {arch.intermediate_size}, "
             f"a {arch.padded_heads(lay.tp)}, t {lay.tp}, {lay.attention}")
    if lay.act_ckpt == "none":
        return inflight * sum(per_layer) + top, (f"({inflight} in flight x {len(layers)} + 1 backward) layers x "
                                                 f"{top / GIB:.2f} GiB ({shape})")
    if lay.act_ckpt == "selective":
        kept = [layer_activations(arch, lay, moe, stage, i in chosen, scores=False) for i in layers]
        return inflight * sum(kept) + top, (f"{inflight} in flight x {len(layers)} layers x {max(kept) / GIB:.2f} GiB "
                                            f"without scores + 1 backward layer x {top / GIB:.2f} GiB with its "
                                            f"recomputed scores ({shape}, selective)")
    layer_in = 2 * lay.seq_len * lay.micro_batch * arch.hidden_size / (lay.tp if lay.sequence_parallel else 1)
    return (inflight * len(layers) * layer_in + 2 * top,
            f"{inflight} in flight x {len(layers)} layer inputs x {layer_in / GIB:.3f} GiB + (1 recomputed + 1 "
            f"backward) layer x {top / GIB:.2f} GiB ({shape})")


def _fmt(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e8 else f"{n / 1e6:.3g}M"


def _per(counts: list[tuple[int, int]], partitioned: bool = True) -> str:
    """'34.5B/32 + 7.05B/8' (params / partition group), or the bare counts when replicated."""
    items = [f"{_fmt(n)}/{d}" if partitioned else _fmt(n) for n, d in counts if n]
    return " + ".join(items) or "0"


def _state_terms(parts: list[tuple[int, int, int]], lay: Layout) -> tuple[list[Term], float]:
    """Model-state terms of (trainable, frozen, partition group) parts, and the offloaded CPU bytes."""
    states = [model_states(t, f, d, lay.zero, lay.offload) for t, f, d in parts]
    st = {k: sum(s[k] for s in states) for k in states[0]}
    z3 = lay.zero == 3
    where = " (ZeRO-3: over DP)" if z3 else f" (ZeRO-{lay.zero}: replicated)"
    trained = [(t, d) for t, _, d in parts]
    over_d, whole = _per(trained), _per(trained, partitioned=False)
    grads = {1: f"2 B x {whole} + 4 B x {over_d}", 2: f"(2 + 4) B x {over_d}", 3: f"4 B x {over_d}"}[lay.zero]
    if lay.offload:
        grads = f"fp32 on CPU; 2 B x {whole} bf16" if lay.zero == 1 else "on CPU"
    return [
        Term("weights (frozen)", st["weights (frozen)"], f"2 B x {_per([(f, d) for _, f, d in parts], z3)}{where}"),
        Term("weights (trainable)", st["weights (trainable)"], f"2 B x {_per(trained, z3)}{where}"),
        Term("gradients", st["gradients"], grads),
        Term("optimizer states", st["optimizer states"],
             "on CPU (offload)" if lay.offload else f"(4 master + 8 Adam m, v) B x {over_d}"),
    ], st["cpu"]


def _buffer_terms(arch: ModelArch, moe: MoCaEPlan, lay: Layout, rank_params: int, zb: ZeroBuffers) -> list[Term]:
    terms = [Term("ZeRO reduce bucket", 2 * zb.reduce_bucket_size,
                  f"2 B x reduce_bucket_size {zb.reduce_bucket_size:.0e}")]
    if lay.zero == 3:
        largest = largest_module(arch, lay.tp, moe, lay.ep)
        terms += [Term("ZeRO-3 gathered params", zero3_gathered(largest, zb),
                       f"2 B x (largest module {_fmt(largest)} + max(prefetch bucket "
                       f"{zb.prefetch_bucket_size:.0e}, it))"),
                  Term("ZeRO-3 reuse window", 2 * min(zb.max_reuse_distance, rank_params),
                       f"2 B x min(max_reuse_distance {zb.max_reuse_distance:.0e}, {_fmt(rank_params)} "
                       "rank params), upper bound")]
    return terms


def rank_memory(arch: ModelArch, moe: MoCaEPlan, lay: Layout, cluster: Cluster, stage: int, pp_rank: int,
                zb: ZeroBuffers = ZeroBuffers()) -> Memory:
    parts = zero_parts(arch, moe, lay.tp, lay.pp, pp_rank, lay.ep, lay.dp(cluster.world), stage)
    terms, cpu = _state_terms([(t, n - t, d) for t, n, d in parts], lay)
    terms.append(Term("activations", *activations(arch, lay, moe, stage, pp_rank)))
    if pp_rank == lay.pp - 1:
        vp = padded_vocab_size(arch.vocab_size, lay.tp) // lay.tp
        sb = lay.seq_len * lay.micro_batch
        terms.append(Term("logits + loss", 10 * sb * vp + 4 * sb * arch.hidden_size,
                          f"(2 bf16 + 4 fp32 + 4 softmax) B x s b V/t ({sb} x {vp}) + final norm 4 s b h"))
    terms += _buffer_terms(arch, stage_moe(moe, stage, lay.ep)[0], lay, sum(n for _, n, _ in parts), zb)
    tensors = sum(t.value for t in terms)
    terms += [Term("CUDA context + NCCL", cluster.context_gib * GIB, f"{cluster.context_gib} GiB per process"),
              Term("fragmentation margin", cluster.margin * tensors, f"{cluster.margin:.0%} of the tensors above")]
    return Memory(pp_rank, tuple(terms), cluster.gpu_mem_gib * GIB, cpu * cluster.gpus_per_node)


def stage_memory(arch: ModelArch, moe: MoCaEPlan, lay: Layout, cluster: Cluster, stage: int) -> Memory:
    """The pipeline stage that needs the most memory."""
    return max((rank_memory(arch, moe, lay, cluster, stage, r) for r in range(lay.pp)), key=lambda m: m.total)
