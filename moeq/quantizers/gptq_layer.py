"""Per-decoder-layer GPTQ/AGQ: installs the calibration hooks of a stage and quantizes what they measured."""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from moeq.calib.capture import CalibExperts, LinearInputs
from moeq.calib.hessian import Hessian
from moeq.config import QuantConfig
from moeq.models import MoEAdapter
from moeq.nn.experts import QuantizedExperts
from moeq.nn.linear import QuantizedLinear
from moeq.quantize_linear import linear_targets, set_module
from moeq.nn.mixed import MixedQuantizedExperts, build_experts
from moeq.quantizers.gptq import GPTQParams, gptq_quantize, gptq_quantize_stack, unstack_packed
from moeq.quantizers.report import ModuleReport, rel_error
from moeq.quantizers.rtn import rtn_quantize

logger = logging.getLogger(__name__)

# GPTQ's fp32 working set is a few copies of the expert stack it batches (the weights, their dequantized
# result, the delta) plus each expert's inverse Hessian: experts go in chunks of about this many bytes of fp32
# weights (Qwen3-30B-A3B gate_up: 20 experts; Mixtral: 1). Results do not depend on the chunking (the batched
# loop is bit-identical to one expert at a time); measured E=16, [768, 1024], 1 thread: chunks of 16 / 8 / 4 / 1
# experts took 4.89 / 4.79 / 5.04 / 5.20 s with identical codes, so the bound costs little time.
STACK_BYTES = 256 * 2**20


class LayerQuantizer:
    """State of one decoder layer across the two calibration stages of :func:`moeq.runner.run_sequential`."""

    def __init__(self, adapter: MoEAdapter, config: QuantConfig, idx: int, layer: nn.Module, affinity: str, report, device):
        self.adapter, self.config, self.layer, self.affinity, self.report, self.device = adapter, config, layer, affinity, report, device
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
        e = self.fp_experts.gate_up_proj.shape[0]
        if stage == 1:
            all_experts = set(range(e)) if self.config.calibrate_all_experts else set()
            self.calib = CalibExperts(self.fp_experts.gate_up_proj, router, "gate_up", self.affinity,
                                      all_tokens_experts=all_experts, track_input=True, device=self.device,
                                      token_budget=self.config.expert_token_budget, act13=act)
        else:
            w13 = torch.cat([p.dequantize(self.fp_experts.gate_up_proj.dtype) for p in self.w13])
            extra = set(range(e)) if self.config.calibrate_all_experts else set(self.sparse)
            self.calib = CalibExperts(w13, router, "down", self.affinity, all_tokens_experts=extra,
                                      hadamard_down=self.config.online_hadamard, device=self.device,
                                      token_budget=self.config.expert_token_budget, act13=act, act2=act)
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
        if stage == 1:
            self._finish_gate_up()
        else:
            self._finish_down()

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

    def _quantize_stack(self, proj: str, w: torch.Tensor, hess, all_hess, fallback_all) -> list:
        """Per-expert packed weights (``[1, N, ...]`` each) of one projection of the routed experts.

        Experts on GPTQ are batched (one column loop per weight spec and chunk of :data:`STACK_BYTES`,
        :func:`gptq_quantize_stack`); the results equal one expert at a time bit for bit. Few-token experts on the RTN fallback are rounded alone.
        """
        scale_dtype = self.config.resolve_scale_dtype(w.dtype)
        t0 = time.perf_counter()
        parts: list = [None] * w.shape[0]
        errs: dict[int, float] = {}
        batches: dict = {}  # spec -> [(expert, hessian, how)]
        for e in range(w.shape[0]):
            spec = self.config.spec_for(self.name, proj, e)
            h, how = self._expert_hessian(e, hess, all_hess, fallback_all)
            if h is None:
                parts[e] = rtn_quantize(w[e], spec, scale_dtype, self.config.w_clip, self.config.clip_grid,
                                        self.config.clip_max_shrink, self.config.clip_norm)
            else:
                batches.setdefault(spec, []).append((e, h, how))
        per_chunk = max(1, STACK_BYTES // (w.shape[1] * w.shape[2] * 4))
        for spec, all_items in batches.items():
            for c0 in range(0, len(all_items), per_chunk):
                items = all_items[c0 : c0 + per_chunk]
                idx = [e for e, _, _ in items]
                packed, stack_errs = gptq_quantize_stack(w[idx], [h for _, h, _ in items], spec, scale_dtype,
                                                         self.params)
                for j, ((e, _, how), part) in enumerate(zip(items, unstack_packed(packed))):
                    parts[e] = part
                    if how == "routed":
                        errs[e] = stack_errs[j]
        werr = 0.0
        for e in sorted(errs):  # summed in expert order, as one expert at a time did
            werr += errs[e]
        deq = torch.cat([p.dequantize(torch.float32) for p in parts])
        self.report.add(ModuleReport(f"{self.name}.{proj}", tuple(w.shape), parts[0].bits, parts[0].group_size,
                                     rel_error(w, deq), time.perf_counter() - t0, sum(self.tokens), werr))
        return parts

    def _finish_gate_up(self) -> None:
        self.tokens = list(self.calib.routed)  # routed tokens, before any expert_token_budget
        total = self.calib.input_hessian.tokens
        self.threshold = self.config.min_expert_tokens_frac * total
        self.sparse = [e for e, n in enumerate(self.tokens) if n < self.threshold]
        if self.sparse:
            logger.info("%s: %d few-token experts (< %.1f of %d tokens): %s -> %s", self.name, len(self.sparse),
                        self.threshold, total, self.sparse, self.config.sparse_expert_fallback)
        self.w13 = self._quantize_stack("gate_up", self.fp_experts.gate_up_proj.detach(), self.calib.hessians,
                                        self.calib.all_hessians, self.calib.input_hessian)
        self.metadata[self.name] = {
            "tokens": self.tokens, "total_tokens": total, "threshold": self.threshold,
            "fallback": self.config.sparse_expert_fallback, "fallback_experts": self.sparse,
            "calibrate_all_experts": self.config.calibrate_all_experts, "affinity": self.affinity,
            "token_budget": self.config.expert_token_budget, "tokens_used": list(self.calib.used),
        }

    def _finish_down(self) -> None:
        w2 = self._quantize_stack("down", self.fp_experts.down_proj.detach(), self.calib.hessians,
                                  self.calib.all_hessians, None)
        q = build_experts(self.w13, w2, self.config.online_hadamard, self.config.backend)
        setattr(self.block, self.adapter.experts_attr, q)
        self.fp_experts = None
