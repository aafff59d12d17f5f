"""``load_quantized``: build the model with parameters on the meta device, swap in ``QuantizedExperts``,
then fill every tensor from the safetensors files. No dense expert weight is ever allocated."""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moeq.io.checkpoint import (FIELDS, PROJ_ROWS, CheckpointError, linear_from_spec, module_from_spec,
                                read_quantization_config, shard_files)
from moeq.io.integrity import check_binding, check_values, read_header
from moeq.io.verify import verify_data
from moeq.models import adapter_for
from moeq.nn.linear import QuantizedLinear
from moeq.nn.mixed import experts_modules
from moeq.quantize_linear import set_module

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def params_on_meta():
    """Inside, every ``nn.Parameter`` registered by a module constructor moves to the meta device, so a model
    can be built without memory for its weights; buffers (e.g. rotary ``inv_freq``, computed in ``__init__``)
    stay real. ``torch.empty`` does not touch pages, so the brief CPU allocation is never resident."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _split_expert_key(key: str, quant: dict[str, nn.Module]):
    """``(module name, expert, proj, field)`` for a per-expert key of a quantized module, else None."""
    parts = key.rsplit(".", 3)
    if len(parts) != 4 or parts[0] not in quant or parts[2] not in PROJ_ROWS or parts[3] not in FIELDS:
        return None
    if not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2], parts[3]


def _load_expert_tensor(mod: nn.Module, key: str, e: int, proj: str, field: str, t: torch.Tensor) -> None:
    prefix, half = PROJ_ROWS[proj]
    if e >= mod.num_experts:
        raise CheckpointError(f"{key}: expert {e} out of range (num_experts={mod.num_experts})")
    grp, le = mod.locate(e)
    dst = getattr(grp, f"{prefix}_{field}")
    if dst is None:
        raise CheckpointError(f"{key}: zero points stored for a symmetric module")
    inter = mod.intermediate_dim
    view = dst[le] if half is None else dst[le, half * inter : (half + 1) * inter]
    if view.shape != t.shape or view.dtype != t.dtype:
        raise CheckpointError(f"{key}: stored {t.dtype} {tuple(t.shape)}, expected {view.dtype} {tuple(view.shape)}")
    spec = grp.w2_spec if prefix == "w2" else grp.w13_spec
    check_values(key, t, spec.bits)
    view.copy_(t)


def assign_tensor(model: nn.Module, key: str, t: torch.Tensor) -> None:
    """Put ``t`` in place of the parameter/buffer ``key`` (shape checked; cast to the model's dtype)."""
    mod_name, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError as exc:
        raise CheckpointError(f"{key}: no such module in the model") from exc
    if attr in mod._parameters:
        old = mod._parameters[attr]
        if old is None or tuple(old.shape) != tuple(t.shape):
            raise CheckpointError(f"{key}: stored shape {tuple(t.shape)}, model expects {None if old is None else tuple(old.shape)}")
        mod._parameters[attr] = nn.Parameter(t.to(old.dtype), requires_grad=False)
    elif attr in mod._buffers and mod._buffers[attr] is not None:
        old = mod._buffers[attr]
        if tuple(old.shape) != tuple(t.shape):
            raise CheckpointError(f"{key}: stored shape {tuple(t.shape)}, model expects {tuple(old.shape)}")
        if isinstance(mod, QuantizedLinear) and attr in FIELDS and t.dtype != old.dtype:
            raise CheckpointError(f"{key}: stored {t.dtype}, the packed format specifies {old.dtype}")
        mod._buffers[attr] = t.to(old.dtype)
    else:
        raise CheckpointError(f"{key}: the model has no parameter or buffer of that name")


def _linear_bits(model: nn.Module, key: str) -> int | None:
    """Bit width of a ``QuantizedLinear`` buffer ``key`` (None for any other tensor)."""
    mod_name, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        return None
    return mod.spec.bits if isinstance(mod, QuantizedLinear) and attr in FIELDS else None


def _expected_expert_keys(quant: dict[str, nn.Module]) -> set[str]:
    keys = set()
    for name, mod in quant.items():
        for e in range(mod.num_experts):
            grp, _ = mod.locate(e)
            for proj, (prefix, _) in PROJ_ROWS.items():
                keys.update(f"{name}.{e}.{proj}.{f}" for f in FIELDS if getattr(grp, f"{prefix}_{f}") is not None)
    return keys


def build_skeleton(path: str | os.PathLike, qcfg: dict, device, dtype, backend: str) -> nn.Module:
    """The model from ``config.json`` with meta parameters and empty ``QuantizedExperts`` on ``device``."""
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers has no handler for quant_method "moeq"
    kwargs = {} if dtype is None else {"dtype": dtype}
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    adapter = adapter_for(model)
    for name, spec in qcfg["modules"].items():
        block_name, _, attr = name.rpartition(".")
        try:
            block = model.get_submodule(block_name)
        except AttributeError as exc:
            raise CheckpointError(f"quantization_config names {name}, which this model does not have") from exc
        if attr != adapter.experts_attr:
            raise CheckpointError(f"quantization_config module {name} is not a routed-experts module of {adapter.name}")
        setattr(block, attr, module_from_spec(spec, device, backend))
    for name, spec in qcfg.get("linear_modules", {}).items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"quantization_config names linear {name}, which this model does not have") from exc
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (spec["in_features"], spec["out_features"]):
            raise CheckpointError(f"quantization_config linear {name} does not match the model's module {old}")
        set_module(model, name, linear_from_spec(spec, device, backend))
    return model


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   backend: str | None = None, verify: bool = False) -> nn.Module:
    """Load a moeq checkpoint written by :func:`moeq.save_quantized` onto ``device`` (eval mode).

    Args:
        dtype: dtype of the non-quantized weights (default: the checkpoint's ``config.dtype``).
        backend: kernel backend of the quantized modules (default: the one recorded, usually ``auto``).
        verify: also hash every shard's data against its recorded SHA-256 (reads every byte twice).
    Checks (:mod:`moeq.io.integrity`): headers consistent with the files, shard paths inside ``path``, every
    tensor's shape and dtype, scales finite and >= 0, zero points in range, floats finite, and the digests that
    bind ``quantization_config`` to the tensors.
    Raises:
        CheckpointError: missing/corrupt files, keys that do not match the model, missing tensors, bad values,
            a config edited after saving.
    """
    qcfg = read_quantization_config(path)
    files = shard_files(path)
    headers = [read_header(f) for f in files]
    if verify:
        verify_data(headers)
    device = torch.device(device)
    model = build_skeleton(path, qcfg, device, dtype, backend or qcfg.get("backend", "auto"))
    quant = experts_modules(model)
    want = _expected_expert_keys(quant)
    got: set[str] = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for key in sf.keys():
                    t = sf.get_tensor(key)
                    hit = _split_expert_key(key, quant)
                    if hit is not None:
                        _load_expert_tensor(quant[hit[0]], key, *hit[1:], t)
                        got.add(key)
                    else:
                        check_values(key, t, _linear_bits(model, key))
                        assign_tensor(model, key, t)
        except SafetensorError as exc:
            raise CheckpointError(f"{f}: corrupt safetensors file ({exc})") from exc
    missing = sorted(want - got)
    if missing:
        raise CheckpointError(f"{len(missing)} packed tensors missing from the checkpoint, e.g. {missing[:3]}")
    model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{len(still_meta)} tensors missing from the checkpoint, e.g. {still_meta[:3]}")
    if not check_binding(qcfg, headers, str(path)):
        logger.warning("%s: format_version %s checkpoint (older moeq) has no digests binding its config to its "
                       "tensors; re-save it to get them", path, qcfg.get("format_version", 0))
    model.to(device)
    model.config.quantization_config = qcfg
    model.eval()
    logger.info("loaded %s: %d quantized experts modules from %d file(s)", path, len(quant), len(files))
    return model
