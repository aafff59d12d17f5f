"""``MixedQuantizedExperts``: routed experts with per-expert bit widths, grouped by scheme.

Experts sharing one (gate_up spec, down spec) form a :class:`QuantizedExperts` group, so every kernel call
stays uniform (the kernels may group experts by bit width). A token slot routed to expert ``e`` is sent to
the group holding ``e`` under its local index; the other groups see the sentinel ``-1``, which every backend
skips. The groups' outputs are summed in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from moeq.config import WeightSpec
from moeq.nn.experts import QuantizedExperts
from moeq_kernels.act_quant import ActSpec
from moeq_kernels.experts import ExpertWeights
from moeq_kernels.packing import PackedWeight


class MixedQuantizedExperts(nn.Module):
    """Same forward as :class:`QuantizedExperts`; ``groups[g]`` holds the experts ``members[g]`` (global ids).

    Buffers: ``group_of`` int64 ``[E]`` (group of each expert), ``local_of`` int64 ``[E]`` (index inside it).
    """

    def __init__(self, members: list[list[int]], groups: list[QuantizedExperts]):
        super().__init__()
        if len(members) != len(groups) or not groups:
            raise ValueError("one member list per group, at least one group")
        ids = sorted(e for m in members for e in m)
        if ids != list(range(len(ids))):
            raise ValueError(f"group members must cover experts 0..E-1 exactly once, got {ids}")
        self.members = [list(m) for m in members]
        self.groups = nn.ModuleList(groups)
        e = len(ids)
        group_of, local_of = torch.empty(e, dtype=torch.long), torch.empty(e, dtype=torch.long)
        for g, m in enumerate(members):
            if groups[g].num_experts != len(m):
                raise ValueError(f"group {g} holds {groups[g].num_experts} experts, members list {len(m)}")
            group_of[m] = g
            local_of[m] = torch.arange(len(m))
        dev = groups[0].w13_qweight.device
        self.register_buffer("group_of", group_of.to(dev if dev.type != "meta" else "cpu"), persistent=False)
        self.register_buffer("local_of", local_of.to(dev if dev.type != "meta" else "cpu"), persistent=False)
        first = groups[0]
        self.num_experts, self.hidden_dim, self.intermediate_dim = e, first.hidden_dim, first.intermediate_dim
        self.online_hadamard, self.activation, self.scale_dtype = first.online_hadamard, first.activation, first.scale_dtype

    @property
    def act13(self) -> ActSpec | None:
        return self.groups[0].act13

    @property
    def act2(self) -> ActSpec | None:
        return self.groups[0].act2

    def set_act_specs(self, act13: ActSpec | None, act2: ActSpec | None) -> None:
        """One pair of activation specs for every group: the groups read the same hidden states."""
        for grp in self.groups:
            grp.set_act_specs(act13, act2)

    def locate(self, e: int) -> tuple[QuantizedExperts, int]:
        g = int(self.group_of[e])
        return self.groups[g], int(self.local_of[e])

    def expert_specs(self) -> list[tuple[WeightSpec, WeightSpec]]:
        """(gate_up spec, down spec) of every expert, by global id."""
        out = [None] * self.num_experts
        for m, grp in zip(self.members, self.groups):
            for e in m:
                out[e] = (grp.w13_spec, grp.w2_spec)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        idx = top_k_index.long()
        valid = (idx >= 0) & (idx < self.num_experts)
        safe = idx.clamp(0, self.num_experts - 1)
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        for g, grp in enumerate(self.groups):
            local = torch.where(valid & (self.group_of[safe] == g), self.local_of[safe], torch.full_like(idx, -1))
            out += grp(hidden_states, local, top_k_weights).float()
        return out.to(hidden_states.dtype)

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``gate_up [E, 2I, H]`` and ``down [E, H, I]`` by global expert id."""
        w13 = torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim, dtype=dtype)
        w2 = torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim, dtype=dtype)
        for m, grp in zip(self.members, self.groups):
            a, b = grp.dequantized(dtype)
            w13[m], w2[m] = a.cpu(), b.cpu()
        return w13, w2

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)


def build_experts(parts13: list[PackedWeight], parts2: list[PackedWeight], online_hadamard: bool, backend: str):
    """A :class:`QuantizedExperts` (one scheme) or :class:`MixedQuantizedExperts` from per-expert packed weights
    (each ``[1, N, ...]``)."""
    from moeq.quantizers.gptq import stack_packed

    def key(p: PackedWeight):
        return (p.bits, p.group_size, p.qzeros is None, p.scales.dtype)

    schemes: dict[tuple, list[int]] = {}
    for e, (a, b) in enumerate(zip(parts13, parts2)):
        schemes.setdefault((key(a), key(b)), []).append(e)
    groups = [QuantizedExperts.from_weights(ExpertWeights(stack_packed([parts13[e] for e in m]),
                                                          stack_packed([parts2[e] for e in m]),
                                                          online_hadamard=online_hadamard), backend=backend)
              for m in schemes.values()]
    if len(groups) == 1:
        return groups[0]
    return MixedQuantizedExperts(list(schemes.values()), groups)


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized experts modules by name (a mixed module's groups are not listed separately)."""
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantizedExperts, MixedQuantizedExperts)) and not any(name.startswith(p + ".") for p in out):
            out[name] = mod
    return out
