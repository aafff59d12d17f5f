"""Per-stage configs: the small dataclasses :class:`~moeq.config.QuantConfig` is composed of.

Each pipeline stage (``moeq.pipeline.stages``) reads only its own config. ``QuantConfig`` keeps the flat
field names as its storage because they are what every checkpoint's ``quantization_config`` holds (old
checkpoints keep loading); :data:`STAGE_CONFIGS` partitions those fields (a test checks that every field is
in exactly one stage), ``QuantConfig.stage(name)`` returns a stage's view and ``QuantConfig.compose(...)``
builds a config from stage configs. A new stage: its dataclass here, its fields on ``QuantConfig``, its flags
in ``moeq/cli_flags.py`` (group = the stage name), its class in the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)  # default act clip-search grid (1.0 = absmax)


@dataclass(frozen=True)
class WeightsConfig:
    """Default weight spec of the routed experts, per-module overrides, extra linear groups, scale dtype."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    scale_dtype: str = "auto"
    overrides: dict = field(default_factory=dict)
    quantize_linears: list = field(default_factory=list)


@dataclass(frozen=True)
class ClipConfig:
    """The per-group MSE clip search of RTN and GPTQ (GPTQ's defaults)."""

    w_clip: bool = True
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4


@dataclass(frozen=True)
class RotationConfig:
    """QuaRot-style residual rotation and the online Hadamard of the routed down inputs."""

    rotation: str | None = None
    rotation_seed: int = 0
    online_hadamard: bool = False


@dataclass(frozen=True)
class SmoothingConfig:
    """EAQuant expert-aware smoothing."""

    smooth: bool = False
    smooth_alpha: float = 0.5
    smooth_aggregation: str = "max"
    smooth_down: bool = True


@dataclass(frozen=True)
class RouterConfig:
    """8-bit routers, KL-aligned with calibration data."""

    router_bits: int | None = None
    router_align: bool = True


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ / AGQ settings and the few-token expert handling."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    affinity: str = "topk"
    min_expert_tokens_frac: float = 0.005
    sparse_expert_fallback: str = "blend"
    calibrate_all_experts: bool = False
    expert_token_budget: int | None = None


@dataclass(frozen=True)
class MixedConfig:
    """A mixed-precision plan: per-expert bit widths by experts module (``moeq.mixed``)."""

    expert_bits: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ActConfig:
    """Dynamic per-token activation quantization (``moeq.act_calib``)."""

    act_bits: int | None = None
    act_format: str = "int"
    act_linears: list = field(default_factory=list)
    act_clip: float = 1.0
    act_clip_search: bool = False
    act_clip_grid: list = field(default_factory=lambda: list(ACT_CLIP_GRID))
    act_hessian: str = "fp"


@dataclass(frozen=True)
class RuntimeConfig:
    """How the quantized modules run."""

    backend: str = "auto"


STAGE_CONFIGS: dict[str, type] = {
    "weights": WeightsConfig, "clip": ClipConfig, "rotation": RotationConfig, "smoothing": SmoothingConfig,
    "router": RouterConfig, "gptq": GPTQConfig, "mixed": MixedConfig, "activations": ActConfig,
    "runtime": RuntimeConfig,
}
