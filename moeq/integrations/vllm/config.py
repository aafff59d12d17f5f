"""``MoeqVllmConfig``: vLLM quantization config for checkpoints ``moeq quantize`` wrote.

The checkpoint's ``config.json`` ``quantization_config`` (``quant_method: "moeq"``) selects it. Its ``modules``
entries (routed experts) get :class:`~moeq.integrations.vllm.moe.MoeqFusedMoEMethod`, its ``linear_modules``
entries :class:`~moeq.integrations.vllm.linear.MoeqLinearMethod`; every other layer keeps vLLM's unquantized
method (routers, shared-expert gates, embeddings, lm_head, unquantized linears).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from moeq.config import FORMAT_VERSION as MAX_FORMAT_VERSION  # the newest checkpoint format this moeq reads
from moeq.config import QUANT_METHOD
from moeq.integrations.vllm.shards import MoeqServingError, refuse_act_quant

logger = logging.getLogger(__name__)



class MoeqVllmConfig(QuantizationConfig):
    """Per-module moeq specs, by checkpoint (Hugging Face) module name."""

    def __init__(self, full_config: dict[str, Any]):
        super().__init__()
        version = full_config.get("format_version", 0)
        if version > MAX_FORMAT_VERSION:
            raise MoeqServingError(f"moeq checkpoint format_version {version} is newer than this plugin reads "
                                   f"({MAX_FORMAT_VERSION}); upgrade moeq in the serving environment")
        refuse_act_quant(full_config)
        self.full_config = full_config
        self.modules: dict[str, dict] = dict(full_config.get("modules", {}))
        self.linear_modules: dict[str, dict] = dict(full_config.get("linear_modules", {}))
        self.backend = full_config.get("backend", "auto")
        if not self.modules and not self.linear_modules:
            raise MoeqServingError("moeq quantization_config lists no quantized modules")

    def __repr__(self) -> str:
        return f"MoeqVllmConfig({len(self.modules)} experts modules, {len(self.linear_modules)} linears)"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the reference backend runs anywhere; cuda/triton are picked per call when present

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MoeqVllmConfig":
        if config.get("quant_method") != QUANT_METHOD:
            raise MoeqServingError(f"not a moeq quantization_config (quant_method={config.get('quant_method')!r})")
        return cls(config)

    def _linear_names(self, prefix: str) -> list[str]:
        """Checkpoint linears that vLLM's layer ``prefix`` holds (one, or the fused ones in shard order)."""
        head, _, last = prefix.rpartition(".")
        subs = self.packed_modules_mapping.get(last)
        if not subs:
            return [prefix]
        return [f"{head}.{s}" if head else s for s in subs]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from moeq.integrations.vllm.linear import MoeqLinearMethod
        from moeq.integrations.vllm.moe import MoeqFusedMoEMethod

        if isinstance(layer, RoutedExperts):
            name = _strip_routed(prefix)
            if name not in self.modules:
                return UnquantizedFusedMoEMethod(layer.moe_config)
            return MoeqFusedMoEMethod(name, self.modules[name], layer.moe_config, self.backend)
        if isinstance(layer, LinearBase):
            names = self._linear_names(prefix)
            found = [n for n in names if n in self.linear_modules]
            if not found:
                return UnquantizedLinearMethod()
            if len(found) != len(names):
                raise MoeqServingError(f"{prefix}: vLLM fuses {names}, but the checkpoint quantized only {found}; "
                                       "quantize all of them or none")
            return MoeqLinearMethod(prefix, names, [self.linear_modules[n] for n in names], self.backend)
        return None


def _strip_routed(prefix: str) -> str:
    """vLLM may name the routed-experts layer ``<block>.experts`` or ``<block>.experts.routed_experts``."""
    return prefix.removesuffix(".routed_experts")
