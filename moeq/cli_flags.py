"""The one table of ``moeq quantize`` flags: each row names the :class:`~moeq.config.QuantConfig` field it sets.

Both the argument parser (:func:`add_quant_args`) and the config (:func:`quant_config`) are derived from
:data:`QUANT_FLAGS`, so a new stage setting is one row here (in its stage's group) next to its ``QuantConfig``
field; ``tests/moeq/test_cli.py`` fails when a field has neither a row nor a place in :data:`NOT_ON_CLI`.
Rows without a field (calibration data, mixed-precision planning) feed the command itself.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from moeq.config import LINEAR_GROUPS, SMOOTH_AGGREGATIONS, QuantConfig


def _same(value, args):
    return value


def _overrides(items: list[str], args) -> dict[str, dict]:
    out = {}
    for item in items:
        name, sep, js = item.partition("=")
        if not sep:
            raise ValueError(f"--override expects MODULE=JSON, got {item!r}")
        try:
            out[name] = json.loads(js)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--override {name}: invalid JSON ({exc})") from exc
    return out


@dataclass(frozen=True)
class Flag:
    """One command-line flag: ``flag`` with argparse ``kwargs``; sets ``QuantConfig.<field>`` to
    ``convert(value, args)`` (``field`` None: not a config setting)."""

    flag: str
    field: str | None
    kwargs: dict = field(default_factory=dict)
    convert: Callable = _same
    group: str = "weights"

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


# argument groups: the stage configs of moeq.stage_configs (a flag's group is the stage owning its field), plus
# the flags that feed the command itself (mixed-precision planning, calibration data)
GROUPS = {
    "weights": None,  # the parser's main group
    "clip": None,
    "rotation": "rotation (QuaRot-style)",
    "router": "routers",
    "activations": "activation quantization (dynamic per token, symmetric; evaluated on the reference backend)",
    "mixed": "mixed precision (routed experts)",
    "calibration": "calibration (gptq, agq, smoothing, mixed-precision scores, activation clips)",
    "gptq": "gptq / agq",
    "smoothing": "EAQuant smoothing",
}

QUANT_FLAGS: tuple[Flag, ...] = (
    Flag("--method", "method", dict(default="rtn", help="quantization method")),  # choices: the registry
    Flag("--bits", "bits", dict(type=int, default=4, choices=[2, 3, 4, 8])),
    Flag("--group-size", "group_size", dict(type=int, default=128, help="input features per scale group; -1 = per-channel")),
    Flag("--asym", "sym", dict(action="store_true", help="asymmetric quantization (zero points)"), lambda v, a: not v),
    Flag("--no-clip", "w_clip", dict(action="store_true", help="disable the per-group MSE clipping search"),
         lambda v, a: not v, "clip"),
    Flag("--scale-dtype", "scale_dtype", dict(default="auto", choices=["auto", "float16", "bfloat16"])),
    Flag("--override", "overrides", dict(action="append", default=[], metavar="MODULE=JSON",
                                         help='per-module spec, e.g. model.layers.0.mlp.experts.down=\'{"bits": 8}\''),
         _overrides),
    Flag("--quantize-linears", "quantize_linears", dict(nargs="*", default=[], choices=list(LINEAR_GROUPS),
                                                        help="also quantize these linear groups (default: routed experts only)")),
    Flag("--rotate", "rotation", dict(action="store_true", help="QuaRot-style Hadamard rotation + online Hadamard on "
                                                                "expert down inputs"),
         lambda v, a: "hadamard" if v else None, "rotation"),
    Flag("--no-online-hadamard", "online_hadamard", dict(action="store_true",
                                                         help="with --rotate: rotate the residual stream only"),
         lambda v, a: a.rotate and not v, "rotation"),
    Flag("--router-bits", "router_bits", dict(type=int, choices=[8], default=None, help="round routers to 8 bits"),
         group="router"),
    Flag("--act-bits", "act_bits", dict(type=int, choices=[4, 8], default=None,
                                        help="quantize the routed experts' inputs (gate_up; down after the online "
                                             "Hadamard) to this width"), group="activations"),
    Flag("--act-format", "act_format", dict(default="int", choices=["int", "fp8_e4m3"], help="fp8_e4m3 needs --act-bits 8"),
         group="activations"),
    Flag("--act-linears", "act_linears", dict(nargs="*", default=[], choices=list(LINEAR_GROUPS),
                                              help="also quantize the inputs of these --quantize-linears groups"),
         group="activations"),
    Flag("--act-clip", "act_clip", dict(type=float, default=1.0, help="clip ratio of the per-token absmax, in (0, 1]"),
         group="activations"),
    Flag("--act-clip-search", "act_clip_search", dict(action="store_true", help="search each layer's clip ratios on "
                                                      "--calib (output MSE vs 16-bit activations)"), group="activations"),
    Flag("--act-hessian", "act_hessian", dict(default="fp", choices=["fp", "quantized"],
                                              help="gptq/agq Hessians from 16-bit inputs (QuaRot) or from act-quantized "
                                                   "inputs"), group="activations"),
    Flag("--mixed-budget", None, dict(type=float, default=None, metavar="BITS", help="average bits per expert weight"),
         group="mixed"),
    Flag("--mixed-levels", None, dict(type=int, nargs=2, default=None, metavar=("LOW", "HIGH")), group="mixed"),
    Flag("--mixed-score", None, dict(default="affinity", choices=["outlier", "frequency", "affinity", "block"]),
         group="mixed"),
    Flag("--mixed-granularity", None, dict(default="expert", choices=["layer", "expert", "linear"]), group="mixed"),
    Flag("--calib", None, dict(metavar="FILE", help="calibration text file, or a .jsonl of token ids (moeq calibrate); "
                                                    "jsonl samples are truncated / padded to --seqlen with padding "
                                                    "masked out"), group="calibration"),
    Flag("--nsamples", None, dict(type=int, default=128), group="calibration"),
    Flag("--seqlen", None, dict(type=int, default=2048), group="calibration"),
    Flag("--seed", None, dict(type=int, default=0), group="calibration"),
    Flag("--affinity", "affinity", dict(default="topk", choices=["topk", "softmax"], help="AGQ token weighting"),
         group="gptq"),
    Flag("--act-order", "act_order", dict(action="store_true"), group="gptq"),
    Flag("--damp", "damp", dict(type=float, default=0.01), group="gptq"),
    Flag("--fallback", "sparse_expert_fallback", dict(default="blend", choices=["blend", "rtn"], help="few-token experts"),
         group="gptq"),
    Flag("--calibrate-all-experts", "calibrate_all_experts", dict(action="store_true"), group="gptq"),
    Flag("--expert-token-budget", "expert_token_budget", dict(type=int, default=None, metavar="N",
                                                              help="at most N calibration tokens per routed expert "
                                                                   "Hessian (gptq, agq)"), group="gptq"),
    Flag("--smooth", "smooth", dict(action="store_true", help="EAQuant expert-aware smoothing before quantization "
                                                              "(any method; needs --calib)"), group="smoothing"),
    Flag("--smooth-alpha", "smooth_alpha", dict(type=float, default=0.5, help="smoothing migration strength in [0, 1]"),
         group="smoothing"),
    Flag("--smooth-aggregation", "smooth_aggregation", dict(default="max", choices=list(SMOOTH_AGGREGATIONS),
                                                            help="how per-expert smoothing scales are combined into "
                                                                 "one per layer"), group="smoothing"),
)

# QuantConfig fields deliberately left to the Python API (their defaults are GPTQ's / the papers')
NOT_ON_CLI = frozenset({"clip_grid", "clip_max_shrink", "clip_norm", "backend", "rotation_seed", "block_size",
                        "min_expert_tokens_frac", "smooth_down", "router_align", "expert_bits", "act_clip_grid"})


def add_quant_args(p: argparse.ArgumentParser) -> None:
    """Add every :data:`QUANT_FLAGS` row to ``p``, in argument groups by stage."""
    from moeq.quantizers import METHODS

    groups = {key: p if title is None else p.add_argument_group(title) for key, title in GROUPS.items()}
    for f in QUANT_FLAGS:
        kwargs = dict(f.kwargs, choices=sorted(METHODS)) if f.field == "method" else f.kwargs
        groups[f.group].add_argument(f.flag, **kwargs)


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The :class:`QuantConfig` the parsed flags describe (each row's ``convert``; the rest default)."""
    return QuantConfig(**{f.field: f.convert(getattr(args, f.dest), args) for f in QUANT_FLAGS if f.field})
