"""Per-decoder-layer GPTQ/AGQ: installs the calibration hooks of a stage and quantizes what they measured."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from torch import nn

from moeq.calib.capture import CalibExperts, LinearInputs
from moeq.calib.hessian import Hessian
from moeq.config import QuantConfig
from moeq.memory import release_freed_memory
from moeq.models import MoEAdapter
from moeq.nn.experts import QuantizedExperts
from moeq.nn.linear import QuantizedLinear
from moeq.quantize_linear import linear_targets, set_module
from moeq.nn.mixed import MixedQuantizedExperts, build_experts
from moeq.quantizers.gptq import GPTQParams, gptq_quantize, gptq_quantize_stack, unstack_packed
from moeq.quantizers.report import ModuleReport, rel_error
from moeq.quantizers.rtn import rtn_quantize

logger = logging.getLogger(__name__)

# GPTQ's fp32 working set is the expert stack it batches plus each expert's inverse-Hessian factor: experts go
# in chunks of about this many bytes of both (N x K + K x K float32 per expert; Qwen3-30B-A3B gate_up: 4
# experts; Mixtral: 1). Results do not depend on the chunking (the batched
# loop is bit-identical to one expert at a time); measured E=16, [768, 1024], 1 thread: chunks of 16 / 8 / 4 / 1
# experts took 4.89 / 4.79 / 5.04 / 5.20 s with identical codes, so the bound costs little time.
STACK_BYTES = 128 * 2**20
# The experts' Hessians (K^2 x 4 bytes each: 16 MiB for K = 2048, 196 MiB for DeepSeek-V3's K = 7168) are
# collected for chunks of experts of about this many bytes at a time (the first calibration pass records the
# experts' inputs, the further chunks replay them; bit-identical, see CalibExperts.next_chunk): with
# STACK_BYTES it bounds a layer's calibration working set to a few hundred MiB beyond the layer and its
# activations, whatever the expert count (Qwen3-30B-A3B's gate_up Hessians alone are 2 GiB per layer).
# Smaller chunks cost little time: a replay only adds one router matmul per recorded call, and the
# Hessians' additions are the same ones (benchmarks/results/stream_memory.md has the measured peaks).
HESSIAN_BYTES = 128 * 2**20


def expert_chunks(num_experts: int, dim: int, all_tokens: set[int], budget: int, extra: int = 0) -> list[list[int]]:
    """Consecutive experts grouped so each group's Hessians (``dim x dim`` float32, two for the experts in
    ``all_tokens``) plus ``extra`` bytes per expert take at most ``budget`` bytes (at least one expert per
    group)."""
    chunks: list[list[int]] = [[]]
    size = 0
    for e in range(num_experts):
        need = dim * dim * 4 * (2 if e in all_tokens else 1) + extra
        if chunks[-1] and size + need > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(e)
        size += need
    return chunks


class _DequantizedStack:
    """The quantized gate_up experts ``[E, 2I, H]`` as the down stage's :class:`CalibExperts` reads them:
    expert ``e`` dequantized (``[2I, H]`` in ``dtype``) when first read and kept until :meth:`retain` drops
    it, so only the current chunk's experts are dense (the whole dense stack is as large as the layer)."""

    def __init__(self, parts: list, dtype: torch.dtype):
        self.parts, self.dtype, self.cache = parts, dtype, {}
        q = parts[0]
        self.shape = (len(parts), q.scales.shape[1], q.scales.shape[2] * q.group_size)

    def __getitem__(self, e: int) -> torch.Tensor:
        if e not in self.cache:
            self.cache[e] = self.parts[e].dequantize(self.dtype)[0]
        return self.cache[e]

    def retain(self, experts) -> None:
        keep = set(experts)
        self.cache = {e: t for e, t in self.cache.items() if e in keep}


class LayerQuantizer:
    """State of one decoder layer across the two calibration stages of :func:`moeq.runner.run_sequential`."""

    def __init__(self, adapter: MoEAdapter, config: QuantConfig, idx: int, layer: nn.Module, affinity: str, report, device,
                 hessian_bytes: int | None = None, scratch: Path | None = None):
        self.adapter, self.config, self.layer, self.affinity, self.report, self.device = adapter, config, layer, affinity, report, device
        self.hessian_bytes = HESSIAN_BYTES if hessian_bytes is None else hessian_bytes
        self.scratch = scratch  # a directory for the recorded expert inputs of chunked calibration, or None
        self.sink = None
        self.prefix = f"{adapter.layers_path}.{idx}"
        self.block = adapter.moe_block(layer)
        self.targets = linear_targets(layer, adapter, config, self.prefix)
        # the linears whose inputs are activation-quantized (their Hessians too, with act_hessian="quantized")
        self.act_linears = set(linear_targets(layer, adapter, dataclasses.replace(config, quantize_linears=config.act_linears),
                                              self.prefix)) if config.act_linears else set()
        self.params = GPTQParams(config.block_size, config.damp, config.act_order, config.w_clip, config.clip_grid,
                                 config.clip_max_shrink, config.clip_norm)
        self.metadata: dict[str, dict] = {}
        self.mask: torch.Tensor | None = None
        self.shared_w: torch.Tensor | None = None
        self._hooks: list = []
        if self.block is not None:
            self.name = adapter.experts_name(idx)
            self.fp_experts = adapter.experts(self.block)
            if isinstance(self.fp_experts, (QuantizedExperts, MixedQuantizedExperts)):
                raise ValueError(f"{self.name} is already quantized")

    # ---- hooks -------------------------------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask.reshape(-1)
        if self.block is not None:
            self.calib.token_mask = self.mask

    def _linear_weights(self, name: str) -> torch.Tensor | None:
        shared = self.block is not None and self.adapter.shared_attr and f".{self.adapter.shared_attr}." in name
        if shared and self.shared_w is not None:
            return self.mask * self.shared_w
        return self.mask

    def _shared_gate_hook(self, module, args):
        gate = self.adapter.shared_gate(self.block)
        x = args[0]
        self.shared_w = torch.sigmoid(gate(x.reshape(-1, x.shape[-1]))).reshape(-1).float()

    def begin(self, stage: int) -> None:
        linears = {n: m for n, (m, s) in self.targets.items() if s == stage}
        act = self.config.act_spec() if self.config.act_hessian == "quantized" else None
        self.lin = LinearInputs(linears, self.device, self._linear_weights,
                                {n: act for n in linears if n in self.act_linears} if act else None)
        if self.block is None:
            return
        if self.affinity != "none" and self.adapter.shared_gate_attr:
            self._hooks.append(self.block.register_forward_pre_hook(self._shared_gate_hook))
        router = self.adapter.router(self.block)
        e, two_i, h = self.fp_experts.gate_up_proj.shape
        everyone = set(range(e)) if self.config.calibrate_all_experts else set()
        extra = everyone if stage == 1 else everyone | set(self.sparse)
        # the down stage also holds its chunk's gate_up experts dense (to compute their down inputs)
        dense = 0 if stage == 1 else two_i * h * self.fp_experts.gate_up_proj.element_size()
        self.chunks = expert_chunks(e, h if stage == 1 else two_i // 2, extra, self.hessian_bytes, dense)
        chunked = {}
        if len(self.chunks) > 1:
            if self.scratch is not None:
                from moeq.pipeline.activations import DiskActivations

                self.sink = DiskActivations(self.scratch / "expert-inputs")
            chunked = dict(experts=self.chunks[0], record=True, record_sink=self.sink)
        if stage == 1:
            self.calib = CalibExperts(self.fp_experts.gate_up_proj, router, "gate_up", self.affinity,
                                      all_tokens_experts=extra, track_input=True, device=self.device,
                                      token_budget=self.config.expert_token_budget, act13=act, **chunked)
        else:
            self.w13_dense = _DequantizedStack(self.w13, self.fp_experts.gate_up_proj.dtype)
            self.calib = CalibExperts(self.w13_dense, router, "down", self.affinity, all_tokens_experts=extra,
                                      hadamard_down=self.config.online_hadamard, device=self.device,
                                      token_budget=self.config.expert_token_budget, act13=act, act2=act, **chunked)
        if len(self.chunks) > 1:
            logger.info("%s: %s Hessians in %d chunks of experts (budget %d MiB)", self.name,
                        "gate_up" if stage == 1 else "down", len(self.chunks), self.hessian_bytes >> 20)
        setattr(self.block, self.adapter.experts_attr, self.calib)

    def end(self, stage: int) -> None:
        self.lin.remove()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for name, (mod, s) in self.targets.items():
            if s == stage:
                self._quantize_linear(name, mod, self.lin.hessians[name])
        if self.block is None:
            return
        setattr(self.block, self.adapter.experts_attr, self.fp_experts)
        try:
            if stage == 1:
                self._finish_gate_up()
            else:
                self._finish_down()
        finally:
            if self.sink is not None:
                self.sink.remove()
                self.sink = None

    # ---- quantization --------------------------------------------------------------------------------------
    def _quantize_linear(self, name: str, linear: nn.Linear, hess: Hessian) -> None:
        t0 = time.perf_counter()
        spec = self.config.spec_for(name, "linear")
        w = linear.weight.detach()
        packed, werr = gptq_quantize(w, hess.h, spec, self.config.resolve_scale_dtype(w.dtype), self.params)
        set_module(self.layer, name[len(self.prefix) + 1 :], QuantizedLinear.from_packed(packed, linear.bias, self.config.backend))
        self._log(name, tuple(w.shape), spec, packed, w, werr, hess.tokens, t0)

    def _log(self, name, shape, spec, packed, w, werr, tokens, t0) -> None:
        self.report.add(ModuleReport(name, shape, spec.bits, packed.group_size,
                                     rel_error(w, packed.dequantize(torch.float32)), time.perf_counter() - t0,
                                     tokens, werr))

    def _expert_hessian(self, e: int, hess, all_hess, fallback_all: Hessian | None) -> tuple[torch.Tensor | None, str]:
        """The Hessian GPTQ uses for expert ``e`` (None = RTN) and how it was chosen."""
        if self.config.calibrate_all_experts:
            return all_hess.get(e).h, "all-tokens"
        n = self.tokens[e]
        if e not in self.sparse:
            return hess.get(e).h, "routed"
        if self.config.sparse_expert_fallback == "rtn":
            return None, "rtn"
        # blend: top the expert's statistics up with all-token statistics to the threshold token count
        frac = n / max(self.threshold, 1e-9)
        base = fallback_all.mean() if fallback_all is not None else all_hess.get(e).mean()
        own = hess.get(e).mean() if n else torch.zeros_like(base)
        return frac * own + (1 - frac) * base, "blend"

    def _quantize_chunk(self, proj: str, w: torch.Tensor, experts: list[int], hess, all_hess, fallback_all,
                        out: "_StackResult") -> None:
        """Quantize ``experts`` of one projection of the routed experts (``w [E, N, K]``) into ``out``.

        Experts on GPTQ are batched (one column loop per weight spec and sub-chunk of :data:`STACK_BYTES`,
        :func:`gptq_quantize_stack`); the results equal one expert at a time bit for bit. Few-token experts on
        the RTN fallback are rounded alone.
        """
        scale_dtype = self.config.resolve_scale_dtype(w.dtype)
        batches: dict = {}  # spec -> [(expert, hessian, how)]
        for e in experts:
            spec = self.config.spec_for(self.name, proj, e)
            h, how = self._expert_hessian(e, hess, all_hess, fallback_all)
            if h is None:
                out.add(e, rtn_quantize(w[e], spec, scale_dtype, self.config.w_clip, self.config.clip_grid,
                                        self.config.clip_max_shrink, self.config.clip_norm), w[e], None)
            else:
                batches.setdefault(spec, []).append((e, h, how))
        per_chunk = max(1, STACK_BYTES // ((w.shape[1] + w.shape[2]) * w.shape[2] * 4))
        for spec, all_items in batches.items():
            for c0 in range(0, len(all_items), per_chunk):
                items = all_items[c0 : c0 + per_chunk]
                idx = [e for e, _, _ in items]
                packed, stack_errs = gptq_quantize_stack(w[idx], [h for _, h, _ in items], spec, scale_dtype,
                                                         self.params)
                for j, ((e, _, how), part) in enumerate(zip(items, unstack_packed(packed))):
                    out.add(e, part, w[e], stack_errs[j] if how == "routed" else None)

    def _quantize_experts(self, proj: str, w: torch.Tensor, fallback_all, on_chunk=None) -> list:
        """Per-expert packed weights (``[1, N, ...]`` each) of one projection, chunk by chunk of
        ``self.chunks``: the first chunk's Hessians are those of the stage's pass, the next ones replayed
        (``on_chunk(experts)`` runs once a chunk's Hessians are complete)."""
        t0 = time.perf_counter()
        out = _StackResult(w.shape[0])
        for ci, experts in enumerate(self.chunks):
            if ci:
                if proj == "down":
                    self.w13_dense.retain(experts)
                self.calib.next_chunk(experts)
            if on_chunk is not None:
                on_chunk(experts)
            self._quantize_chunk(proj, w, experts, self.calib.hessians, self.calib.all_hessians, fallback_all, out)
            release_freed_memory()  # the next chunk's Hessians reuse this one's pages instead of new ones
        self.report.add(ModuleReport(f"{self.name}.{proj}", tuple(w.shape), out.parts[0].bits, out.parts[0].group_size,
                                     out.rel_error(), time.perf_counter() - t0, sum(self.tokens), out.weighted_error()))
        return out.parts

    def _finish_gate_up(self) -> None:
        total = self.calib.input_hessian.tokens
        self.threshold = self.config.min_expert_tokens_frac * total
        self.sparse = []

        def few_token(experts):  # their routed counts are complete once their chunk's Hessians are
            self.sparse += [e for e in experts if self.calib.routed[e] < self.threshold]

        self.tokens = self.calib.routed  # routed tokens, before any expert_token_budget (filled chunk by chunk)
        self.w13 = self._quantize_experts("gate_up", self.fp_experts.gate_up_proj.detach(), self.calib.input_hessian,
                                          few_token)
        self.tokens = list(self.calib.routed)
        if self.sparse:
            logger.info("%s: %d few-token experts (< %.1f of %d tokens): %s -> %s", self.name, len(self.sparse),
                        self.threshold, total, self.sparse, self.config.sparse_expert_fallback)
        self.metadata[self.name] = {
            "tokens": self.tokens, "total_tokens": total, "threshold": self.threshold,
            "fallback": self.config.sparse_expert_fallback, "fallback_experts": self.sparse,
            "calibrate_all_experts": self.config.calibrate_all_experts, "affinity": self.affinity,
            "token_budget": self.config.expert_token_budget, "tokens_used": list(self.calib.used),
        }
        self.calib = None  # its Hessians and recorded inputs

    def _finish_down(self) -> None:
        w2 = self._quantize_experts("down", self.fp_experts.down_proj.detach(), None)
        self.calib = self.w13_dense = None
        q = build_experts(self.w13, w2, self.config.online_hadamard, self.config.backend)
        setattr(self.block, self.adapter.experts_attr, q)
        self.fp_experts = None


class _StackResult:
    """What the chunks of one projection's experts produced: packed parts by expert, the Hessian-weighted
    errors of the GPTQ-routed ones, and the sums of ``||W - Q||^2`` / ``||W||^2`` (float64) for the report,
    so no dense copy of the whole stack is ever made."""

    def __init__(self, num_experts: int):
        self.parts: list = [None] * num_experts
        self.errs: dict[int, float] = {}
        self.err_sq = self.w_sq = 0.0

    def add(self, e: int, part, w: torch.Tensor, weighted: float | None) -> None:
        self.parts[e] = part
        if weighted is not None:
            self.errs[e] = weighted
        wf = w.detach().to(torch.float32)
        self.err_sq += float((wf - part.dequantize(torch.float32)[0]).square().sum(dtype=torch.float64))
        self.w_sq += float(wf.square().sum(dtype=torch.float64))

    def rel_error(self) -> float:
        return (self.err_sq / max(self.w_sq, 1e-60)) ** 0.5

    def weighted_error(self) -> float:
        total = 0.0
        for e in sorted(self.errs):  # summed in expert order, as one expert at a time did
            total += self.errs[e]
        return total
