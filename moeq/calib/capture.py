"""``CalibExperts``: stands in for a routed-experts module during calibration.

It receives exactly what the experts module receives, ``hidden [T, H]`` with ``top_k_index [T, k]`` and
``top_k_weights [T, k]`` for the same tokens in the same order, so each expert's Hessian is built from the
tokens the router really sent to it. As a guard against the misalignment bug of the original MoEQuant code
(inputs captured in one order, routing in another), every call re-runs the router on the hidden states it got
and checks the selected experts agree (:class:`RoutingMisalignmentError`).

Weighting of a routed token's contribution (``affinity``):
- ``none``: 1 (plain GPTQ on the expert's tokens);
- ``topk``: the routing weight the model multiplies the expert's output by (after top-k renormalization and
  scaling, e.g. DeepSeek's ``routed_scaling_factor``). This is MoEQuant's AGQ affinity ``c_{t,e}``: the
  expert's output error reaches the layer output scaled by it, so ``sum_t c_{t,e} x_t x_t^T`` weights the
  GPTQ objective by how much each token's error matters;
- ``softmax``: the router's full softmax probability of the expert (before top-k), a smoother variant.

Expert token budget (``token_budget``): each expert's routed Hessian takes at most that many (unmasked) tokens,
the first ones routed to it in calibration order (deterministic, so the gate_up and down stages see the same
tokens), so heavily used experts do not dominate calibration cost; ``routed`` still counts every routed token.

Activation-quantized Hessians (``act13`` / ``act2``, ``QuantConfig.act_hessian="quantized"``): the Hessians are
of the inputs as a W4A8 / W4A4 model computes them: ``x`` fake-quantized per token with ``act13``, and the down
input built from that ``x`` then fake-quantized (after the online Hadamard) with ``act2``, so GPTQ minimizes
``||W X_q - W_q X_q||``. moeq's default (``act_hessian="fp"``) follows QuaRot's public code instead, whose GPTQ
pass runs before its activation quantizers are configured: Hessians of 16-bit (rotated) inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeq.calib.hessian import ExpertHessians, Hessian
from moeq_kernels.act_quant import ActSpec, fake_quant_act
from moeq_kernels.hadamard import hadamard_transform

AFFINITIES = ("none", "topk", "softmax")


class RoutingMisalignmentError(RuntimeError):
    """Captured expert inputs do not belong to the routing decisions they were paired with."""


class CalibExperts(nn.Module):
    """Eager experts that accumulate per-expert Hessians of their gate_up and/or down inputs.

    Args:
        gate_up: dense ``[E, 2I, H]`` weights used to compute the down inputs (the original weights, or the
            dequantized quantized ones once gate_up is quantized, so down sees what it will see at inference).
        router: the block's router (returns ``logits, weights, indices``), for the alignment check and
            the ``softmax`` affinity.
        collect: ``"gate_up"`` or ``"down"``.
        all_tokens_experts: experts that also accumulate a Hessian over *all* tokens (``all_*`` attributes):
            every expert when ``calibrate_all_experts``, else the few-token experts that get a blended Hessian.
        hadamard_down: the down projection has an online Hadamard, so its Hessian is of ``h H_I / sqrt(I)``.
        track_input: also accumulate ``input_hessian``, the unweighted Hessian of every (unmasked) token's
            input, the all-token statistics that few-token experts' gate_up Hessians are blended with.
        token_budget: at most this many routed tokens per expert in ``hessians`` (None = all); ``routed [E]``
            counts the unmasked routed tokens, ``used [E]`` those that entered ``hessians``.
        act13, act2: activation specs the Hessian inputs are fake-quantized with (module docstring), or None.
        experts: the experts whose Hessians (routed and all-token) are accumulated (None: all). A layer whose
            experts' Hessians do not fit in memory at once is calibrated in chunks of experts: the first pass
            runs with ``record=True``, and :meth:`next_chunk` replays what it recorded for each further chunk.
        record: keep every call's inputs (``records``) for :meth:`next_chunk`.
        record_sink: where the recorded hidden states go (an object with ``append`` and indexing, e.g.
            :class:`moeq.pipeline.activations.DiskActivations` under ``--offload-dir``); None = memory.
    The forward returns zeros: during calibration passes the layer's output is discarded (the MoE block is the
    last sub-module of a decoder layer), so the down projection itself is skipped.
    """

    def __init__(self, gate_up: torch.Tensor, router: nn.Module, collect: str, affinity: str, act=F.silu,
                 all_tokens_experts: set[int] | None = None, track_input: bool = False,
                 hadamard_down: bool = False, device: torch.device | str = "cpu", token_budget: int | None = None,
                 act13: ActSpec | None = None, act2: ActSpec | None = None, experts=None, record: bool = False,
                 record_sink=None):
        super().__init__()
        self.act13, self.act2 = act13, act2
        if affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
        self.gate_up, self.router, self.collect, self.affinity, self.act = gate_up, router, collect, affinity, act
        self.hadamard_down = hadamard_down
        e, two_i, h = gate_up.shape
        dim = h if collect == "gate_up" else two_i // 2
        self.hessians = ExpertHessians(e, dim, device)
        self.all_tokens_experts = all_tokens_experts or set()
        self.all_hessians = ExpertHessians(e, dim, device)
        self.input_hessian = Hessian(h, device) if track_input else None
        self.token_mask: torch.Tensor | None = None  # [T] 0/1 for the sample in flight (padding -> 0)
        self.token_budget = token_budget
        self.routed, self.used = [0] * e, [0] * e
        self.active = None if experts is None else set(experts)
        # per call: (hidden [T, H], top_k_index [T, k], top_k_weights [T, k], token_mask [T] or None)
        self.records: list | None = [] if record else None
        self.record_sink = record_sink  # holds the hidden states; records then keep (sink index, device)

    def next_chunk(self, experts) -> None:
        """Accumulate the Hessians of ``experts`` (only: the previous chunk's are dropped) by replaying the
        recorded calls. Each expert's Hessian sees the same additions in the same order as in one unchunked
        pass, so it has the same bits; ``input_hessian`` (all experts' common statistics) is not touched."""
        if self.records is None:
            raise RuntimeError("next_chunk needs a first pass with record=True")
        self.hessians = ExpertHessians(self.hessians.num_experts, self.hessians.dim, self.hessians.device)
        self.all_hessians = ExpertHessians(self.all_hessians.num_experts, self.all_hessians.dim, self.all_hessians.device)
        self.active = set(experts)
        track, self.input_hessian = self.input_hessian, None
        records, self.records = self.records, None
        try:
            for hidden, index, weights, mask in records:
                if self.record_sink is not None:
                    j, device = hidden
                    hidden = self.record_sink[j].to(device)
                self.token_mask = mask
                self.forward(hidden, index, weights)
        finally:
            self.input_hessian, self.records = track, records

    def _check_alignment(self, hidden: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        logits, _, idx = self.router(hidden)
        if not torch.equal(idx.sort(-1).values, top_k_index.sort(-1).values):
            bad = (idx.sort(-1).values != top_k_index.sort(-1).values).any(-1).sum()
            raise RoutingMisalignmentError(
                f"{int(bad)} of {hidden.shape[0]} tokens reached the experts with routing that the router does "
                f"not produce for them: expert inputs and routing are misaligned"
            )
        return logits

    def _down_input(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up[e].to(x.dtype)).chunk(2, dim=-1)
        h = self.act(gate) * up
        return fake_quant_act(hadamard_transform(h) if self.hadamard_down else h, self.act2)

    def _within_budget(self, e: int, slots: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
        """The routing slots of expert ``e`` that enter its Hessian: unmasked, and the budget not yet spent."""
        slots = slots[mask[slots // k] > 0]
        self.routed[e] += slots.numel()
        if self.token_budget is not None:
            slots = slots[: max(self.token_budget - self.used[e], 0)]
        self.used[e] += slots.numel()
        return slots

    def _stats(self, e: int, x: torch.Tensor, w: torch.Tensor, into: ExpertHessians) -> None:
        into.add(e, x if self.collect == "gate_up" else self._down_input(e, x), w)

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.records is not None:
            if self.record_sink is not None:
                kept = (len(self.record_sink), hidden.device)
                self.record_sink.append(hidden)
            else:
                kept = hidden.clone()  # a copy: the model may reuse or modify its buffer after this call
            self.records.append((kept, top_k_index, top_k_weights, self.token_mask))
        logits = self._check_alignment(hidden, top_k_index)
        mask = torch.ones(hidden.shape[0], device=hidden.device) if self.token_mask is None else self.token_mask.to(hidden.device).float()
        probs = F.softmax(logits.float(), dim=-1)
        hidden = fake_quant_act(hidden, self.act13)  # what the experts read (routing was checked on the original)
        if self.input_hessian is not None:
            self.input_hessian.add(hidden, mask)
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        for e in torch.unique(flat).tolist():
            if self.active is not None and e not in self.active:
                continue
            slots = self._within_budget(e, (flat == e).nonzero().squeeze(-1), mask, k)
            if slots.numel() == 0:
                continue
            tok = slots // k
            if self.affinity == "none":
                w = mask[tok]
            elif self.affinity == "topk":
                w = top_k_weights.reshape(-1)[slots].float() * mask[tok]
            else:
                w = probs[tok, e] * mask[tok]
            self._stats(e, hidden[tok], w, self.hessians)
        for e in sorted(self.all_tokens_experts):
            if self.active is not None and e not in self.active:
                continue
            w = mask if self.affinity == "none" else probs[:, e] * mask
            self._stats(e, hidden, w, self.all_hessians)
        return torch.zeros_like(hidden)


class LinearInputs:
    """Forward pre-hooks accumulating the input Hessian of named ``nn.Linear`` modules.

    ``weights_fn()`` returns per-token weights ``[T]`` for the sample in flight (padding mask, times e.g. the
    shared-expert sigmoid gate under AGQ) or None.
    """

    def __init__(self, modules: dict[str, nn.Linear], device, weights_fn, act: dict[str, ActSpec] | None = None):
        self.act = act or {}  # per linear: its input is fake-quantized before entering the Hessian
        self.hessians = {n: Hessian(m.in_features, device) for n, m in modules.items()}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]
        self.weights_fn = weights_fn

    def _hook(self, name: str):
        def hook(module, args):
            x = fake_quant_act(args[0], self.act.get(name))
            self.hessians[name].add(x.reshape(-1, x.shape[-1]), self.weights_fn(name))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
