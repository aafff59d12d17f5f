"""Save and load quantized checkpoints (safetensors + ``config.json`` with a ``quantization_config``).

On disk, every routed expert is stored on its own so other tools can map it::

    <experts module>.<e>.gate_proj.qweight  int32 [I, H*b/32]     rows [0, I) of the fused gate_up stack
    <experts module>.<e>.gate_proj.scales   fp16/bf16 [I, H/g]
    <experts module>.<e>.gate_proj.qzeros   uint8 [I, H/g]         (asymmetric only)
    <experts module>.<e>.up_proj.*          rows [I, 2I) of the fused stack
    <experts module>.<e>.down_proj.*        int32 [H, I*b/32], [H, I/g]

(packing: ``moeq_kernels.packing``). All other tensors keep their transformers names. Large checkpoints are
sharded as ``model-XXXXX-of-YYYYY.safetensors`` with a ``model.safetensors.index.json`` weight map.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from moeq.config import FORMAT_VERSION, QUANT_METHOD, QuantConfig, WeightSpec, dtype_name, parse_dtype
from moeq.io.atomic import (ST_DTYPES, CheckpointTransaction, DestinationError, check_destination,
                            interrupted_replace_note, write_json, write_safetensors)
from moeq.io.integrity import (META_CONFIG, META_DATA, META_LAYOUT, CheckpointError, canonical_sha256, check_values,
                               inside, layout_sha256, validate_quantization_config)
from moeq.models import MoEAdapter
from moeq.nn.experts import QuantizedExperts
from moeq.nn.linear import QuantizedLinear
from moeq.nn.mixed import MixedQuantizedExperts, experts_modules
from moeq_kernels.act_quant import ActSpec

logger = logging.getLogger(__name__)

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROJ_ROWS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}
FIELDS = ("qweight", "scales", "qzeros")
__all__ = ["CheckpointError", "DestinationError", "read_quantization_config", "save_quantized",
           "shard_files"]


def _version() -> str:
    from moeq import __version__

    return __version__


def quantization_config_dict(model: nn.Module, adapter: MoEAdapter, config: QuantConfig, calibration: dict) -> dict:
    """The ``quantization_config`` entry: global settings, each quantized module's exact specs
    (``modules``: experts; ``linear_modules``: plain linears) and calibration facts (token counts per expert,
    few-token fallbacks). Activation specs (with their searched clip ratios) are recorded per module as
    ``act13`` / ``act2`` (experts) and ``act`` (linears), present only when activations are quantized."""
    modules, linears = module_entries(model, adapter)
    return quantization_config_from(config, modules, linears, calibration)


def quantization_config_from(config: QuantConfig, modules: dict, linears: dict, calibration: dict) -> dict:
    """``quantization_config`` from its parts (the streaming pipeline gathers them layer by layer)."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "moeq_version": _version(),
            **config.to_dict(), "modules": modules, "linear_modules": linears, "calibration": calibration}


def module_entries(model: nn.Module, adapter: MoEAdapter, prefix: str = "") -> tuple[dict, dict]:
    """``(modules, linear_modules)`` entries of the quantized modules of ``model`` whose names start with
    ``prefix`` (parameters may be on the meta device: only shapes and specs are read)."""
    linears = {n: {**m.spec.to_dict(), "group_size": m.group_size, "in_features": m.in_features,
                   "out_features": m.out_features, "bias": m.bias is not None, "scale_dtype": dtype_name(m.scale_dtype),
                   **_act_entries(act=m.act)}
               for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and n.startswith(prefix)}
    modules = {}
    for idx, block in adapter.moe_layers(model):
        ex = adapter.experts(block)
        name = adapter.experts_name(idx)
        if not isinstance(ex, (QuantizedExperts, MixedQuantizedExperts)) or not name.startswith(prefix):
            continue
        first = ex if isinstance(ex, QuantizedExperts) else ex.groups[0]
        entry = {
            "num_experts": ex.num_experts, "hidden_dim": ex.hidden_dim, "intermediate_dim": ex.intermediate_dim,
            "gate_up": first.w13_spec.to_dict(), "down": first.w2_spec.to_dict(),
            "scale_dtype": dtype_name(ex.scale_dtype), "activation": ex.activation,
            "online_hadamard": ex.online_hadamard, **_act_entries(act13=ex.act13, act2=ex.act2),
        }
        if isinstance(ex, MixedQuantizedExperts):
            entry["expert_specs"] = [[a.to_dict(), b.to_dict()] for a, b in ex.expert_specs()]
        modules[name] = entry
    return modules, linears


def _act_entries(**specs: ActSpec | None) -> dict:
    return {k: v.to_dict() for k, v in specs.items() if v is not None}


def _act_spec(d: dict | None) -> ActSpec | None:
    return None if d is None else ActSpec.from_dict(d)


def _expert_tensors(name: str, mod: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    inter = mod.intermediate_dim
    for e in range(mod.num_experts):
        grp, le = mod.locate(e)
        for proj, (prefix, half) in PROJ_ROWS.items():
            for field in FIELDS:
                t = getattr(grp, f"{prefix}_{field}")
                if t is None:
                    continue
                t = t[le] if half is None else t[le, half * inter : (half + 1) * inter]
                out[f"{name}.{e}.{proj}.{field}"] = t.contiguous().clone()
    return out


def checkpoint_tensors(model: nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor to save: per-expert packed tensors plus the rest of the state dict (tied copies dropped).

    Args:
        prefix: only the submodule of that name (``"model.layers.3"``), keys kept in full.
        skip: leave out the tensors under these module names (the streaming pipeline writes the decoder
            layers on their own).
    """
    root = model.get_submodule(prefix) if prefix else model
    lead = f"{prefix}." if prefix else ""
    quant = {lead + n: m for n, m in experts_modules(root).items()}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in root.state_dict(prefix=lead).items():
        if any(key.startswith(q + ".") for q in quant) or any(key.startswith(s + ".") for s in skip):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights (lm_head = embed_tokens): re-tied by tie_weights() on load
            continue
        seen.add(ptr)
        out[key] = t.contiguous()
    for name, mod in quant.items():
        if not any(name.startswith(s + ".") for s in skip):
            out.update(_expert_tensors(name, mod))
    return out


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, max_shard_bytes: int = 5 * 2**30,
                   overwrite: bool = False, sources: tuple = (), on_step: Callable[[str], None] | None = None) -> Path:
    """Write ``config.json`` (with ``quantization_config``) and the packed safetensors to ``out_dir`` as one
    transaction (:mod:`moeq.io.atomic`): an interrupt or error at any point leaves ``out_dir`` as it was.

    Args:
        overwrite: replace an existing moeq checkpoint at ``out_dir`` (otherwise :class:`DestinationError`;
            a non-empty directory moeq did not write is always refused).
        sources: directories the output must not equal, lie inside or contain (the model's source).
        on_step: called with each step's name before it runs (fault-injection hook for tests).
    Every shard carries the digests of :mod:`moeq.io.integrity`; the same model gives the same bytes.
    """
    qcfg = getattr(model.config, "quantization_config", None)
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        raise ValueError("model is not quantized by moeq: call moeq.quantize_model first")
    out = check_destination(out_dir, list(sources), overwrite)
    tensors = {k: t.detach().cpu() for k, t in checkpoint_tensors(model).items()}
    _check_finite_scales(tensors)
    shards = _split_shards(tensors, max_shard_bytes)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1:  # record the real dtype (a model cast with .to() keeps a stale config.dtype)
        model.config.dtype = dtypes.pop()
    with CheckpointTransaction(out, on_step) as tx:
        tx.step("config")
        model.config.save_pretrained(tx.dir)
        written = json.loads((tx.dir / "config.json").read_text())["quantization_config"]
        meta = {"format": "pt", "quant_method": QUANT_METHOD, "moeq_format_version": str(FORMAT_VERSION),
                META_CONFIG: canonical_sha256(written),
                META_LAYOUT: layout_sha256({k: (ST_DTYPES[t.dtype], tuple(t.shape)) for k, t in tensors.items()})}
        names = [SAFE_NAME] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(len(shards))]
        for i, (fname, shard) in enumerate(zip(names, shards)):
            tx.step(f"shard{i}")
            write_safetensors(tx.dir / fname, shard, meta, digest_key=META_DATA)
        if len(shards) > 1:
            tx.step("index")
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json(tx.dir / INDEX_NAME, {"metadata": {"total_size": total},
                                             "weight_map": {k: f for f, sh in zip(names, shards) for k in sh}})
        tx.step("side_files")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tx.dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tx.dir)
    logger.info("saved %d tensors in %d shard(s) to %s", len(tensors), len(shards), out)
    return out


def _split_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive shards of at most ``max_shard_bytes`` (a larger single tensor gets a shard of its own)."""
    shards, cur, size = [], {}, 0
    for key, t in tensors.items():
        nb = t.numel() * t.element_size()
        if cur and size + nb > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[key] = t
        size += nb
    shards.append(cur)
    return shards


def _check_finite_scales(tensors: dict[str, torch.Tensor]) -> None:
    """Never write a checkpoint whose scales are not finite (a NaN source weight would make every logit NaN)."""
    for key, t in tensors.items():
        if key.endswith(".scales"):
            check_values(key, t)


def read_quantization_config(path: str | os.PathLike) -> dict:
    """The ``quantization_config`` of a moeq checkpoint directory; :class:`CheckpointError` if absent, corrupt
    or not shaped as moeq writes it."""
    p = Path(path)
    if not p.is_dir():
        note = interrupted_replace_note(p.absolute())
        raise CheckpointError(f"{p}: not a directory" + (f" ({note})" if note else ""))
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{p}: no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: corrupt JSON ({exc})") from exc
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{cfg_file}: no moeq quantization_config (is this a quantized moeq checkpoint?)")
    version = q.get("format_version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{cfg_file}: quantization_config.format_version must be an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format_version {version} is newer than this moeq ({FORMAT_VERSION})")
    validate_quantization_config(q, str(cfg_file))
    return q


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint (from the index when sharded; every path inside ``path``)."""
    p = Path(path)
    index = p / INDEX_NAME
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            files = sorted(set(wmap.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: corrupt index ({exc!r})") from exc
        if not all(isinstance(f, str) for f in files):
            raise CheckpointError(f"{index}: corrupt index (weight_map values must be file names)")
        paths = [inside(p, f) for f in files]
        missing = [f for f, q in zip(files, paths) if not q.is_file()]
        if missing:
            raise CheckpointError(f"{p}: shard(s) listed in {INDEX_NAME} are missing: {missing}")
        return paths
    if (p / SAFE_NAME).is_file():
        return [p / SAFE_NAME]
    raise CheckpointError(f"{p}: no {SAFE_NAME} or {INDEX_NAME}")


def module_from_spec(spec: dict, device, backend: str) -> nn.Module:
    """An empty :class:`QuantizedExperts` (or :class:`MixedQuantizedExperts` when the entry lists per-expert
    specs) on ``device`` shaped by one ``modules`` entry of the config."""
    per_expert = spec.get("expert_specs") or [[spec["gate_up"], spec["down"]]] * spec["num_experts"]
    schemes: dict[str, list[int]] = {}
    for e, pair in enumerate(per_expert):
        schemes.setdefault(json.dumps(pair, sort_keys=True), []).append(e)
    groups = []
    for key, members in schemes.items():
        a, b = json.loads(key)
        groups.append(QuantizedExperts(
            len(members), spec["hidden_dim"], spec["intermediate_dim"], WeightSpec.from_dict(a), WeightSpec.from_dict(b),
            parse_dtype(spec["scale_dtype"]), spec.get("activation", "silu"), bool(spec.get("online_hadamard", False)),
            backend, device=device, act13=_act_spec(spec.get("act13")), act2=_act_spec(spec.get("act2"))))
    return groups[0] if len(groups) == 1 else MixedQuantizedExperts(list(schemes.values()), groups)


def linear_from_spec(spec: dict, device, backend: str) -> QuantizedLinear:
    """An empty :class:`QuantizedLinear` on ``device`` shaped by one ``linear_modules`` entry."""
    return QuantizedLinear(spec["in_features"], spec["out_features"], WeightSpec.from_dict(spec),
                           parse_dtype(spec["scale_dtype"]), spec["bias"], backend, device=device,
                           act=_act_spec(spec.get("act")))
