"""Quantization configs: dataclasses serialized into ``config.json``'s ``quantization_config``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from moeq_kernels.act_quant import ACT_FORMATS, ActSpec
from moeq_kernels.packing import SUPPORTED_BITS

ACT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)  # default act clip-search grid (1.0 = absmax)
QUANT_METHOD = "moeq"
FORMAT_VERSION = 2  # 2: shards carry config/layout/data digests (moeq.io.integrity)
LINEAR_GROUPS = ("attention", "shared_experts", "dense_mlp")
SMOOTH_AGGREGATIONS = ("max", "frequency", "router_prob")
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class WeightSpec:
    """How one weight stack is quantized: bit width, group size along K (-1 = per-channel), symmetry."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} not supported; choose from {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per-channel), got {self.group_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WeightSpec":
        return cls(**{k: d[k] for k in ("bits", "group_size", "sym") if k in d})


@dataclass
class QuantConfig:
    """What ``moeq.quantize_model`` / ``moeq.pipeline.quantize_checkpoint`` do: ``method`` plus the settings of
    every stage, stored flat (the names every checkpoint's ``quantization_config`` holds) and grouped into the
    stage configs of :mod:`moeq.stage_configs` (:meth:`stage`, :meth:`compose`).

    Attributes:
        method: quantizer name, a key of ``moeq.quantizers.METHODS`` (``rtn``; GPTQ-family methods register
            themselves there).
        bits, group_size, sym: default :class:`WeightSpec` of every routed-expert projection.
        w_clip: search a per-group clipping ratio minimizing the quantization error (MSE clip search).
        clip_grid, clip_max_shrink, clip_norm: the search grid ``p = 1 - i / clip_grid`` for
            ``i < clip_max_shrink * clip_grid`` and the error norm ``sum |q(w) - w| ** clip_norm``
            (GPTQ's defaults: 100, 0.8, 2.4).
        scale_dtype: ``auto`` (model dtype when 16-bit, else bfloat16), ``float16`` or ``bfloat16``.
        online_hadamard: the down projections carry an online Hadamard on their input (set by rotation).
        rotation: residual-stream rotation applied before quantization (``hadamard``: QuaRot-style random
            Hadamard, see ``moeq.rotation``), or None. ``rotation_seed`` seeds its random signs.
        overrides: per-module ``WeightSpec`` fields by module name (e.g.
            ``{"model.layers.0.mlp.experts": {"bits": 8}}``); a ``.gate_up`` / ``.down`` suffix targets one
            projection.
        backend: kernel backend of the quantized modules (``auto``, ``cuda``, ``triton``, ``reference``).
        quantize_linears: extra linear groups to quantize besides routed experts: ``attention``,
            ``shared_experts``, ``dense_mlp`` (dense MLPs of dense layers). Routers, shared-expert gates,
            embeddings and lm_head are never in these groups.
        router_bits: None keeps routers in 16-bit; 8 rounds router weights to an 8-bit per-channel grid
            (stored in 16-bit; routers are a negligible share of memory).
        damp, block_size, act_order: GPTQ damping (fraction of mean diag H), lazy-update block, column order
            by decreasing diag(H) with static groups.
        affinity: AGQ token weighting ``none`` | ``topk`` | ``softmax`` (see ``moeq.calib.capture``).
        min_expert_tokens_frac: experts routed fewer than this fraction of a layer's calibration tokens are
            "few-token" experts, handled by ``sparse_expert_fallback``: ``blend`` (their Hessian is topped up
            with the all-token Hessian of the same input up to the threshold) or ``rtn``.
        calibrate_all_experts: every expert's Hessian sees every token (routed outputs are unaffected).
        smooth: EAQuant smoothing before quantization (``moeq.smoothing``; needs ``calib`` for every method).
            With ``rotation`` both are applied: rotation (norms fused, residual stream rotated) first, smoothing
            in the rotated basis, then the online Hadamard of the smoothed down input (``moeq.smoothing``). ``smooth_alpha`` is the migration
            strength, ``smooth_aggregation`` (``max`` | ``frequency`` | ``router_prob``) how the per-expert
            scales become the one vector folded into the post-attention norm, ``smooth_down`` also smooths
            every expert's down-projection input.
        router_align: with ``router_bits=8`` and calibration data, pick each router's 8-bit clipping ratio
            minimizing the KL divergence of its top-k routing (``moeq.router_align``); without calibration data
            routers get plain absmax rounding.
        expert_token_budget: at most this many calibration tokens (the first routed ones) per routed expert
            Hessian in GPTQ/AGQ; None = all.
        act_bits: dynamic per-token activation quantization (``moeq_kernels.act_quant``) of the routed experts'
            inputs (gate_up input; down input after the online Hadamard): None (16-bit), 8 or 4.
            ``act_format``: ``int`` or ``fp8_e4m3`` (8 bits only). ``act_linears``: groups of
            ``quantize_linears`` whose quantized linears also get their input quantized. ``act_clip``: the clip
            ratio of every spec when not searched. ``act_clip_search``: per layer, pick the gate_up / down
            (and each act linear's) clip from ``act_clip_grid`` minimizing the output MSE against 16-bit
            activations on the calibration tokens (``moeq.act_calib``; needs ``calib``). ``act_hessian``:
            ``fp`` (GPTQ/AGQ Hessians from 16-bit inputs, QuaRot's convention) or ``quantized`` (from inputs
            fake-quantized with ``act_clip``).
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    w_clip: bool = True
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4
    scale_dtype: str = "auto"
    online_hadamard: bool = False
    rotation: str | None = None
    rotation_seed: int = 0
    overrides: dict[str, dict] = field(default_factory=dict)
    backend: str = "auto"
    quantize_linears: list[str] = field(default_factory=list)
    router_bits: int | None = None
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    affinity: str = "topk"
    min_expert_tokens_frac: float = 0.005
    sparse_expert_fallback: str = "blend"
    calibrate_all_experts: bool = False
    expert_bits: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    smooth: bool = False
    smooth_alpha: float = 0.5
    smooth_aggregation: str = "max"
    smooth_down: bool = True
    router_align: bool = True
    expert_token_budget: int | None = None
    act_bits: int | None = None
    act_format: str = "int"
    act_linears: list[str] = field(default_factory=list)
    act_clip: float = 1.0
    act_clip_search: bool = False
    act_clip_grid: list[float] = field(default_factory=lambda: list(ACT_CLIP_GRID))
    act_hessian: str = "fp"

    def __post_init__(self):
        WeightSpec(self.bits, self.group_size, self.sym)  # validates
        if self.scale_dtype not in ("auto", *_SCALE_DTYPES):
            raise ValueError(f"scale_dtype must be auto, float16 or bfloat16, got {self.scale_dtype!r}")
        if not 0 < self.clip_max_shrink < 1 or self.clip_grid < 1:
            raise ValueError("clip_max_shrink must be in (0, 1) and clip_grid >= 1")
        bad = set(self.quantize_linears) - set(LINEAR_GROUPS)
        if bad:
            raise ValueError(f"quantize_linears has unknown groups {sorted(bad)}; choose from {LINEAR_GROUPS}")
        if self.rotation not in (None, "hadamard"):
            raise ValueError(f"rotation must be None or 'hadamard', got {self.rotation!r}")
        if self.online_hadamard and self.rotation is None:
            raise ValueError("online_hadamard needs rotation='hadamard' (the down weights must be rotated offline)")
        if self.router_bits not in (None, 8):
            raise ValueError(f"router_bits must be None (16-bit) or 8, got {self.router_bits}")
        if self.affinity not in ("none", "topk", "softmax"):
            raise ValueError(f"affinity must be none, topk or softmax, got {self.affinity!r}")
        if self.sparse_expert_fallback not in ("blend", "rtn"):
            raise ValueError(f"sparse_expert_fallback must be blend or rtn, got {self.sparse_expert_fallback!r}")
        if not 0 <= self.min_expert_tokens_frac < 1 or self.damp <= 0 or self.block_size < 1:
            raise ValueError("min_expert_tokens_frac must be in [0, 1), damp > 0, block_size >= 1")
        if self.smooth_aggregation not in SMOOTH_AGGREGATIONS or not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_aggregation must be one of {SMOOTH_AGGREGATIONS} and smooth_alpha in [0, 1], "
                             f"got {self.smooth_aggregation!r}, {self.smooth_alpha}")
        if self.expert_token_budget is not None and self.expert_token_budget < 1:
            raise ValueError(f"expert_token_budget must be None or >= 1, got {self.expert_token_budget}")
        self._check_act()
        for name, plan in self.expert_bits.items():
            for proj, bits in plan.items():
                if proj not in ("gate_up", "down") or any(b not in (2, 3, 4, 8) for b in bits):
                    raise ValueError(f"expert_bits[{name!r}][{proj!r}] must map gate_up/down to bits in 2/3/4/8")
        for name, d in self.overrides.items():
            unknown = set(d) - {"bits", "group_size", "sym"}
            if unknown:
                raise ValueError(f"override for {name} has unknown keys {sorted(unknown)}")
            WeightSpec.from_dict({**self.default_spec().to_dict(), **d})

    def _check_act(self) -> None:
        if self.act_bits is None:
            if self.act_linears or self.act_clip_search or self.act_hessian != "fp":
                raise ValueError("act_linears / act_clip_search / act_hessian need act_bits (4 or 8)")
            return
        if self.act_format not in ACT_FORMATS:
            raise ValueError(f"act_format must be one of {ACT_FORMATS}, got {self.act_format!r}")
        ActSpec(self.act_bits, self.act_format, self.act_clip)  # validates bits x format and the clip range
        bad = set(self.act_linears) - set(self.quantize_linears)
        if bad:
            raise ValueError(f"act_linears {sorted(bad)} are not in quantize_linears {self.quantize_linears}: only "
                             "quantized linears get activation quantization")
        if not self.act_clip_grid or any(not 0.0 < float(c) <= 1.0 for c in self.act_clip_grid):
            raise ValueError(f"act_clip_grid must be a non-empty list of ratios in (0, 1], got {self.act_clip_grid}")
        if self.act_hessian not in ("fp", "quantized"):
            raise ValueError(f"act_hessian must be fp or quantized, got {self.act_hessian!r}")

    def act_spec(self, clip: float | None = None) -> ActSpec | None:
        """The activation spec of this run (``clip`` defaults to ``act_clip``), or None when activations stay
        16-bit."""
        if self.act_bits is None:
            return None
        return ActSpec(self.act_bits, self.act_format, self.act_clip if clip is None else float(clip))

    def stage(self, name: str):
        """The config of one stage (a :data:`moeq.stage_configs.STAGE_CONFIGS` dataclass) viewed from this one."""
        cls = STAGE_CONFIGS[name]
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def compose(cls, method: str = "rtn", **stages) -> "QuantConfig":
        """A config from stage configs by stage name, e.g. ``compose("gptq", weights=WeightsConfig(bits=3),
        smoothing=SmoothingConfig(smooth=True))``; stages not given keep their defaults."""
        unknown = set(stages) - set(STAGE_CONFIGS)
        if unknown:
            raise ValueError(f"unknown stage config(s) {sorted(unknown)}; stages are {sorted(STAGE_CONFIGS)}")
        kw = {"method": method}
        for name, sc in stages.items():
            if not isinstance(sc, STAGE_CONFIGS[name]):
                raise TypeError(f"{name}= needs a {STAGE_CONFIGS[name].__name__}, got {type(sc).__name__}")
            kw.update(dataclasses.asdict(sc))
        return cls(**kw)

    def default_spec(self) -> WeightSpec:
        return WeightSpec(self.bits, self.group_size, self.sym)

    def spec_for(self, module_name: str, proj: str, expert: int | None = None) -> WeightSpec:
        """The spec of projection ``proj`` (``gate_up``, ``down`` or ``linear``) of ``module_name`` (and of one
        expert of it, when a mixed-precision plan gives that expert its own bit width)."""
        d = self.default_spec().to_dict()
        d.update(self.overrides.get(module_name, {}))
        d.update(self.overrides.get(f"{module_name}.{proj}", {}))
        plan = self.expert_bits.get(module_name, {}).get(proj)
        if plan is not None and expert is not None:
            d["bits"] = plan[expert]
        return WeightSpec.from_dict(d)

    def is_mixed(self, module_name: str) -> bool:
        return module_name in self.expert_bits

    def resolve_scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        if self.scale_dtype != "auto":
            return _SCALE_DTYPES[self.scale_dtype]
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    table = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(table)}")
    return table[name]


# The stages QuantConfig is composed of: (class name, what it holds, its fields). The stage dataclasses are built
# from QuantConfig's own field declarations below, so each setting's type and default is written once.
STAGE_FIELDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "weights": ("WeightsConfig", "Default weight spec of the routed experts, per-module overrides, extra linear "
                "groups, scale dtype.", ("bits", "group_size", "sym", "scale_dtype", "overrides", "quantize_linears")),
    "clip": ("ClipConfig", "The per-group MSE clip search of RTN and GPTQ (GPTQ's defaults).",
             ("w_clip", "clip_grid", "clip_max_shrink", "clip_norm")),
    "rotation": ("RotationConfig", "QuaRot-style residual rotation and the online Hadamard of the routed down inputs.",
                 ("rotation", "rotation_seed", "online_hadamard")),
    "smoothing": ("SmoothingConfig", "EAQuant expert-aware smoothing.",
                  ("smooth", "smooth_alpha", "smooth_aggregation", "smooth_down")),
    "router": ("RouterConfig", "8-bit routers, KL-aligned with calibration data.", ("router_bits", "router_align")),
    "gptq": ("GPTQConfig", "GPTQ / AGQ settings and the few-token expert handling.",
             ("damp", "block_size", "act_order", "affinity", "min_expert_tokens_frac", "sparse_expert_fallback",
              "calibrate_all_experts", "expert_token_budget")),
    "mixed": ("MixedConfig", "A mixed-precision plan: per-expert bit widths by experts module (moeq.mixed).",
              ("expert_bits",)),
    "activations": ("ActConfig", "Dynamic per-token activation quantization (moeq.act_calib).",
                    ("act_bits", "act_format", "act_linears", "act_clip", "act_clip_search", "act_clip_grid",
                     "act_hessian")),
    "runtime": ("RuntimeConfig", "How the quantized modules run.", ("backend",)),
}


def _stage_class(cls_name: str, doc: str, names: tuple[str, ...]) -> type:
    """A frozen dataclass of the QuantConfig fields ``names``, with their types and defaults."""
    declared = {f.name: f for f in dataclasses.fields(QuantConfig)}
    spec = []
    for n in names:
        f = declared[n]
        kw = {"default": f.default} if f.default is not dataclasses.MISSING else {"default_factory": f.default_factory}
        spec.append((n, f.type, field(**kw)))
    cls = dataclasses.make_dataclass(cls_name, spec, frozen=True)
    cls.__module__, cls.__doc__ = "moeq.stage_configs", doc
    return cls


STAGE_CONFIGS: dict[str, type] = {key: _stage_class(*entry) for key, entry in STAGE_FIELDS.items()}
