"""The HHH experts of a MoCaE block, tensor-parallel like the FFN they replace.

`LoRAExperts`: low-rank deltas of the frozen base FFN. The base gate/up projection runs once per
token; since the down projection is linear, the base down projection also runs once, on the
routing-weighted mixture of the experts' activations:
    y = (sum_i w_i a_i) W_down^T + sum_i w_i s (a_i A_down,i^T) B_down,i^T,
    a_i = act(x W_gate^T + s (x A_gate,i^T) B_gate,i^T) * (x W_up^T + s (x A_up,i^T) B_up,i^T),
act the base FFN's own gated activation (silu: SwiGLU; tanh GELU: Gemma's GeGLU), taken from its
megatron config so an expert never computes another activation than the FFN it adapts.
`FullExperts`: whole FFNs upcycled from the base FFN, each TP-sharded like it and spread over the
expert-parallel group; tokens travel by all-to-all (`parallel/dispatch.py`).

TP layout (column-parallel gate/up, row-parallel down): gate/up A [r, H] replicated, B [F/tp, r]
sharded; down A [r, F/tp] sharded, B [H, r] replicated. Gradient reductions follow megatron's
mappings: the replicated low-rank activations go through copy-to-TP (all-reduce of their
gradient; parallel/sequence.py's `sum_grad_over_tp`, which unlike megatron's also reduces a
non-contiguous gradient), the down path's partial products through
reduce_from_tensor_model_parallel_region.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from torch import nn

from trinityx_ds.model.mocae_spec import PROJECTIONS, expert_shapes
from trinityx_ds.parallel import sequence as seq
from trinityx_ds.parallel.dispatch import run_experts

TARGETS = PROJECTIONS


class LoRAExperts(nn.Module):
    """E low-rank expert deltas of one TP-sharded gated FFN, stacked on a leading expert dim."""

    def __init__(self, num_experts: int, hidden: int, ffn_local: int, rank: int, alpha: float,
                 dropout: float = 0.0, targets=TARGETS, dtype=torch.float32, activation=F.silu):
        super().__init__()
        self.activation = activation
        self.num_experts, self.rank, self.scale = num_experts, rank, alpha / rank
        self.targets = tuple(targets)
        self.dropout = nn.Dropout(dropout)
        shapes = {"gate_proj": ((rank, hidden), (ffn_local, rank)), "up_proj": ((rank, hidden), (ffn_local, rank)),
                  "down_proj": ((rank, ffn_local), (hidden, rank))}
        for t in self.targets:
            (a_shape, b_shape) = shapes[t]
            # B = 0: every expert starts as the base FFN exactly (LoRA's standard init)
            self.register_parameter(f"{t}_A", nn.Parameter(torch.empty(num_experts, *a_shape, dtype=dtype)))
            self.register_parameter(f"{t}_B", nn.Parameter(torch.zeros(num_experts, *b_shape, dtype=dtype)))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for t in self.targets:
                a = getattr(self, f"{t}_A")
                # kaiming-uniform on the full fan-in, so every TP layout draws the same A for gate/up
                bound = 1.0 / math.sqrt(a.shape[-1])
                a.uniform_(-bound, bound, generator=generator)
                getattr(self, f"{t}_B").zero_()

    def _stacked_A(self, target: str) -> torch.Tensor:
        """[E*r, in]: every expert's A, so one matmul gives all low-rank activations."""
        a = getattr(self, f"{target}_A")
        return a.reshape(-1, a.shape[-1])

    def _stacked_B(self, target: str) -> torch.Tensor:
        """[E*r, out]: every expert's B^T stacked to match `_stacked_A`'s rows."""
        b = getattr(self, f"{target}_B")
        return b[0].t() if b.shape[0] == 1 else b.transpose(1, 2).reshape(-1, b.shape[1])

    def _fc1_B(self, gate_up: tuple[str, ...]) -> torch.Tensor:
        """[n*E*r, 2*F]: the gate and up B^T as one block-diagonal matrix over fc1's [gate | up]
        columns (a zero block for a target not adapted), so both low-rank updates are one addmm
        into fc1's whole output rather than two into its non-contiguous halves (each of which
        torch copies first)."""
        if len(gate_up) == 2:
            return torch.block_diag(self._stacked_B("gate_proj"), self._stacked_B("up_proj"))
        b = self._stacked_B(gate_up[0])
        pad = b.new_zeros(b.shape)
        return torch.cat([b, pad] if gate_up[0] == "gate_proj" else [pad, b], dim=1)

    def forward(self, x_TH: torch.Tensor, mlp: nn.Module, topk_idx_TK: torch.Tensor,
                topk_weight_TK: torch.Tensor | None) -> torch.Tensor:
        """Fused output [T, H] (already reduced across TP) of the routed experts; `mlp` holds the
        frozen base FFN's `linear_fc1` / `linear_fc2`. `topk_weight_TK` None: every weight is 1
        (one expert forced on every token, stage 1), and nothing is multiplied by it.

        Slot by slot (each token has exactly one expert per top-k slot), everything is a dense
        matmul: the low-rank activations of all experts are computed once ([T, E*r]) and masked to
        the slot's expert (no mask with one expert), so no gather/scatter of [T, F] activations is
        needed. The [T, F] work beyond the base FFN is kept to the low-rank updates: gate and up
        together one addmm into fc1's output (`_fc1_B`), down one addmm into fc2's; with one slot,
        the routing weight scales the [T, H] output instead of the [T, F] activations.

        Sequence parallelism (the base linears built for it): x_TH, the routing and the output are
        this rank's tokens only; fc1 all-gathers the tokens and fc2 reduce-scatters, as in
        megatron's MLP, and the low-rank paths follow the same pattern: the replicated factors (gate/up
        A, down B) run on this rank's tokens with their gradient summed over TP
        (parallel/sequence.py), the gate/up low-rank activations are all-gathered before meeting the
        column-parallel side, the down path's partial products reduce-scattered after the
        row-parallel side.
        """
        sp = seq.active(mlp)
        if sp:
            topk_idx_TK = seq.gather_tokens(topk_idx_TK)  # every token's experts, for the TP-sharded [T, F] side
        K = topk_idx_TK.shape[1]
        E, r = self.num_experts, self.rank
        fc1_TF2, _ = mlp.linear_fc1(x_TH.unsqueeze(1))
        fc1_TF2 = fc1_TF2.squeeze(1)
        x_low = self.dropout(x_TH)
        gate_up = tuple(t for t in ("gate_proj", "up_proj") if t in self.targets)
        low_TN = None  # [T, n*E*r]: the gate and up low-rank activations of every expert
        if gate_up:
            a_NH = torch.cat([self._stacked_A(t) for t in gate_up])  # [n*E*r, H]
            if sp:  # this rank's tokens through the replicated A; gathered, their gradient reduce-scattered
                low_TN = seq.gather_tokens(x_low @ seq.sum_grad_over_tp(a_NH).t())
            else:  # replicated across TP, meeting TP-sharded B: their gradient is all-reduced
                low_TN = seq.sum_grad_over_tp(x_low @ a_NH.t())
            b_fc1 = self._fc1_B(gate_up)
        # One slot: the weight multiplies the reduced [T, H] output, replicated across TP (its
        # gradient is whole on every rank; under SP both are this rank's tokens). Several: it meets
        # TP-sharded activations (and the down path's pre-reduce partial sums), so its gradient is
        # partial per rank, summed by the copy region's backward (under SP, the gather's
        # reduce-scatter).
        weight_TK = None if topk_weight_TK is None else topk_weight_TK.to(x_TH.dtype)
        weight_mix_TK = (None if K == 1 or weight_TK is None else seq.gather_tokens(weight_TK) if sp
                         else seq.sum_grad_over_tp(weight_TK))
        mix_TF = down_low = None
        for k in range(K):
            # the slot's expert's r columns of every [T, E*r] block (one expert: all of them)
            onehot_TEr = None if E == 1 else \
                F.one_hot(topk_idx_TK[:, k], E).to(x_TH.dtype).repeat_interleave(r, dim=1)
            h_TF2 = fc1_TF2
            if low_TN is not None:
                masked = low_TN if onehot_TEr is None else low_TN * onehot_TEr.repeat(1, len(gate_up))
                h_TF2 = torch.addmm(fc1_TF2, masked, b_fc1, alpha=self.scale)
            g, u = h_TF2.chunk(2, dim=-1)
            a_TF = self.activation(g) * u
            if "down_proj" in self.targets:
                partial = self.dropout(a_TF) @ self._stacked_A("down_proj").t()
                if onehot_TEr is not None:
                    partial = partial * onehot_TEr
                if weight_mix_TK is not None:
                    partial = weight_mix_TK[:, k, None] * partial
                down_low = partial if down_low is None else down_low + partial
            if weight_mix_TK is not None:
                a_TF = weight_mix_TK[:, k, None] * a_TF
            mix_TF = a_TF if mix_TF is None else mix_TF + a_TF
        y_TH, _ = mlp.linear_fc2(mix_TF.unsqueeze(1))
        y_TH = y_TH.squeeze(1)
        if down_low is not None:
            b_down = self._stacked_B("down_proj")
            if sp:
                down_low = seq.reduce_scatter_tokens(down_low)
                y_TH = torch.addmm(y_TH, down_low, seq.sum_grad_over_tp(b_down), alpha=self.scale)
            else:
                down_low = tensor_parallel.reduce_from_tensor_model_parallel_region(down_low)
                y_TH = torch.addmm(y_TH, down_low, b_down, alpha=self.scale)
        return y_TH * weight_TK if K == 1 and weight_TK is not None else y_TH


class FullExperts(nn.Module):
    """This EP rank's whole-FFN experts (global indices `local_ids`), each a TP-sharded megatron MLP
    built from the backbone's config, so it runs the backbone's activation (SwiGLU or GeGLU)."""

    def __init__(self, config, num_experts: int, local_ids: list[int], ep_group=None):
        super().__init__()
        self.num_experts, self.local_ids, self.ep_group = num_experts, list(local_ids), ep_group
        # Under sequence parallelism the block hands the experts the TP group's whole tokens
        # (model/mocae.py): their own linears must not gather them again.
        config = copy.copy(config)
        config.sequence_parallel = False
        spec = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        self.local = nn.ModuleDict({str(i): MLP(config, spec) for i in self.local_ids})

    @torch.no_grad()
    def upcycle(self, base: MLP) -> None:
        """Every local expert starts as a copy of the backbone FFN."""
        for mlp in self.local.values():
            mlp.linear_fc1.weight.copy_(base.linear_fc1.weight)
            mlp.linear_fc2.weight.copy_(base.linear_fc2.weight)

    def _expert(self, i: int):
        mlp = self.local[str(i)]
        return lambda x_NH: mlp(x_NH.unsqueeze(1))[0].squeeze(1)

    def forward(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        return run_experts(x_TH, topk_idx_TK, topk_weight_TK, [self._expert(i) for i in self.local_ids],
                           self.num_experts, group=self.ep_group)


def lora_init_tensors(arch, cfg, seed: int) -> dict[str, torch.Tensor]:
    """HF-named initial LoRA tensors (A kaiming-uniform on its full fan-in, B zero; shapes from
    mocae_spec.expert_shapes), drawn per layer, expert and target from `seed`, so every TP layout
    starts from the same function."""
    shapes = {name: expert_shapes(arch, cfg, name) for name in cfg.expert_names}
    out = {}
    for layer in cfg.layer_ids(arch.num_layers):
        for e, name in enumerate(cfg.expert_names):
            for k, target in enumerate(TARGETS):
                pre = f"model.layers.{layer}.mlp.experts.{name}.{target}."
                if pre + "lora_A.weight" not in shapes[name]:
                    continue
                a_shape = shapes[name][pre + "lora_A.weight"]
                g = torch.Generator().manual_seed(((seed * 1_000_003 + layer) * 1009 + e) * 31 + k)
                bound = 1.0 / math.sqrt(a_shape[1])
                out[pre + "lora_A.weight"] = torch.empty(a_shape).uniform_(-bound, bound, generator=g)
                out[pre + "lora_B.weight"] = torch.zeros(shapes[name][pre + "lora_B.weight"])
    return out
