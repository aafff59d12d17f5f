"""The source-checkpoint reader: validate a local HF checkpoint before any work starts, then stream it one
submodule at a time in the model's own naming.

``transformers.from_pretrained`` random-initializes whatever a checkpoint lacks and reads any file an index
names; a quantizer fed that output quantizes noise and reports success. :class:`SourceCheckpoint` instead

* parses ``config.json``, the shard index and every shard *header* up front (no tensor data), refusing an index
  entry outside the directory, a missing shard, a truncated or corrupt shard - each error names the file;
* :meth:`~SourceCheckpoint.check_against` a model built on the meta device: every parameter and persistent
  buffer it declares must come from a stored float (or block-FP8 + scale) tensor of the right shape, tied
  weights may come from their partner; missing / wrong-shape / wrong-dtype / unexpected tensors are listed;
* :meth:`~SourceCheckpoint.load_module` materializes one submodule (e.g. ``model.layers.3``): per-expert hub
  keys stacked into the fused ``gate_up_proj [E, 2I, H]`` (gate rows first) / ``down_proj [E, H, I]``, block
  FP8 dequantized, any NaN/Inf refused naming the source tensor and position; only that submodule's bytes are
  read;
* :func:`refuse_quantized_source` refuses checkpoints that are already quantized (moeq, GPTQ, AWQ,
  compressed-tensors, bitsandbytes, ...) with what they are and what to use instead. Block-scaled FP8
  (DeepSeek-V3/R1, Qwen3 FP8: ``quant_method: fp8``, ``weight_block_size: [128, 128]``, float8_e4m3fn weights
  with float32 ``weight_scale_inv`` per block, ``W = q * scale_inv``) is a supported source.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from moeq.io.checkpoint import INDEX_NAME, SAFE_NAME, CheckpointError
from moeq.io.source_keys import FP8_AUX_SUFFIXES, SCALE_SUFFIX, Plan, build_plan, missing_parts
from moeq.io.source_tensors import (FLOAT_DTYPES, FP8_DTYPES, ShardReader, TensorInfo, check_finite,
                                    dequantize_fp8_blocks, read_header)
from moeq.models import adapter_for

logger = logging.getLogger(__name__)

SUPPORTED_KINDS = (None, "fp8")
# tensor-name evidence of a quantized checkpoint without (or with a stripped) quantization_config
_KEY_EVIDENCE = (
    (".g_idx", "gptq"), (".weight_packed", "compressed-tensors"), (".weight_shape", "compressed-tensors"),
    (".SCB", "bitsandbytes"), (".weight_format", "bitsandbytes"), (".absmax", "bitsandbytes"),
    (".quant_state.bitsandbytes__nf4", "bitsandbytes"), (".quant_state.bitsandbytes__fp4", "bitsandbytes"),
    (".qweight", "packed-integer (qweight/scales)"), (".qzeros", "packed-integer (qweight/scales)"),
)
_SHOWN = 5  # names listed per problem class before "... (+N more)"


def _load_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt {what} JSON ({exc})") from exc


def _shard_path(root: Path, name, index: Path) -> Path:
    """The shard ``name`` of the index, resolved; it must stay inside ``root`` (after symlinks and '..')."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise CheckpointError(f"{index}: shard {name!r} is not a relative file name inside the checkpoint directory")
    p = (root / name).resolve()
    if not p.is_relative_to(root.resolve()):
        raise CheckpointError(f"{index}: shard {name!r} resolves to {p}, outside the checkpoint directory {root}")
    if not p.is_file():
        raise CheckpointError(f"{index}: shard {name!r} is missing ({p})")
    return p


def _listing(title: str, items: list[str]) -> str:
    more = f" ... (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"  {title} ({len(items)}): " + "; ".join(items[:_SHOWN]) + more


class SourceCheckpoint:
    """A local HF checkpoint directory read lazily: ``config.json``, the shard index and safetensors headers.

    Attributes:
        path: the directory.
        config: ``config.json`` as a dict.
        tensors: stored name -> :class:`~moeq.io.source_tensors.TensorInfo` (file, dtype, shape, byte range).
        metadata: ``__metadata__`` of the shards, merged.
    Raises (constructor):
        CheckpointError naming the file: not a directory, no/corrupt ``config.json``, corrupt index, an index
        entry outside the directory or missing, a key the index puts in a shard that lacks it, no safetensors
        at all, a truncated or corrupt shard.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{self.path}: no config.json")
        self.config = _load_json(cfg_file, "config")
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_file}: corrupt config (not a JSON object)")
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        for shard, keys in self._shards().items():
            found, meta = read_header(shard)
            self.metadata.update(meta)
            if keys is None:
                self.tensors.update(found)
                continue
            lost = sorted(k for k in keys if k not in found)
            if lost:
                raise CheckpointError(f"{shard}: the index puts {len(lost)} tensor(s) in this shard that it does not "
                                      f"contain, e.g. {lost[:3]}")
            self.tensors.update({k: found[k] for k in keys})
        self._plans: dict[tuple, Plan] = {}
        self.last_bytes_read = 0  # bytes the last load_module read (its memory footprint follows it)

    def _shards(self) -> dict[Path, list[str] | None]:
        """Shard path -> keys the index assigns it (None: an unindexed single file, all its keys)."""
        index = self.path / INDEX_NAME
        if index.is_file():
            data = _load_json(index, "index")
            wmap = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wmap, dict) or not wmap:
                raise CheckpointError(f"{index}: corrupt index (no weight_map)")
            out: dict[Path, list[str]] = {}
            for key, name in wmap.items():
                out.setdefault(_shard_path(self.path, name, index), []).append(key)
            return out
        single = self.path / SAFE_NAME
        if single.is_file():
            return {single: None}
        other = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt*"))
        hint = f" (found {other[:3]}: only safetensors checkpoints are read; convert them first)" if other else ""
        raise CheckpointError(f"{self.path}: no {SAFE_NAME} or {INDEX_NAME}{hint}")

    # ---- what the checkpoint is -------------------------------------------------------------------------

    def quantization_config(self) -> dict | None:
        q = self.config.get("quantization_config")
        return q if isinstance(q, dict) else None

    def fp8_block(self) -> tuple[int, int] | None:
        """``weight_block_size`` of a block-FP8 checkpoint, or None."""
        q = self.quantization_config() or {}
        b = q.get("weight_block_size")
        if str(q.get("quant_method", "")).lower() != "fp8" or not isinstance(b, (list, tuple)) or len(b) != 2:
            return None
        if not all(isinstance(x, int) and x > 0 for x in b):
            return None
        return int(b[0]), int(b[1])

    def _kind_and_evidence(self) -> tuple[str | None, str]:
        if isinstance(self.config.get("compression_config"), dict):
            return "compressed-tensors", "config.json compression_config"
        q = self.quantization_config()
        if q is not None and q.get("quant_method"):
            method = str(q["quant_method"]).lower()
            ev = f"config.json quantization_config.quant_method = {q['quant_method']!r}"
            if method == "fp8" and self.fp8_block() is None:
                return "fp8 without weight_block_size", ev + f", weight_block_size = {q.get('weight_block_size')!r}"
            return method, ev
        if self.metadata.get("quant_method"):
            return str(self.metadata["quant_method"]).lower(), f"safetensors metadata quant_method = " \
                                                               f"{self.metadata['quant_method']!r}"
        for suffix, kind in _KEY_EVIDENCE:
            hit = next((k for k in self.tensors if k.endswith(suffix)), None)
            if hit is not None:
                return kind, f"tensor {hit}"
        hit = next((k for k, t in self.tensors.items() if t.dtype in FP8_DTYPES), None)
        if hit is not None:
            return "fp8 without quantization_config", f"tensor {hit} is {self.tensors[hit].dtype}"
        return None, ""

    def quantized_kind(self) -> str | None:
        """None for a full-precision checkpoint; ``"fp8"`` for block-scaled FP8 (supported, dequantized on load);
        otherwise what it is quantized with: ``"moeq"``, ``"gptq"``, ``"awq"``, ``"compressed-tensors"``,
        ``"bitsandbytes"``, the config's ``quant_method``, ... (refused as a source)."""
        return self._kind_and_evidence()[0]

    def refuse_if_quantized(self) -> None:
        """CheckpointError when the checkpoint is already quantized (anything but full precision or block FP8)."""
        kind, evidence = self._kind_and_evidence()
        if kind in SUPPORTED_KINDS:
            return
        if kind == "moeq":
            raise CheckpointError(
                f"{self.path} is already quantized by moeq ({evidence}); quantizing it again would start from "
                f"packed weights: use moeq.load_quantized / `moeq eval --model {self.path}` / `moeq info` to use it, "
                "or pass the original full-precision model to `moeq quantize --model`")
        raise CheckpointError(
            f"{self.path} is already quantized ({kind}: {evidence}); moeq quantizes full-precision (or "
            "block-scaled FP8) weights, and re-quantizing already quantized weights compounds their error: pass "
            "the original unquantized model to `moeq quantize --model` (run this one with the tool that made it)")

    # ---- the model skeleton -----------------------------------------------------------------------------

    def build_meta_model(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The CausalLM of ``config.json`` with every tensor on the meta device (no memory for weights).

        Args:
            dtype: the model's dtype; default the config's ``dtype`` when it is a 16/32-bit float, else float32.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.path)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # weights are dequantized by moeq, not by a transformers quantizer
        if dtype is None:
            dtype = getattr(config, "dtype", None)
            dtype = getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else dtype
            dtype = dtype if dtype in FLOAT_DTYPES else torch.float32
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)

    def _plan(self, model: nn.Module) -> tuple[Plan, dict[str, torch.Tensor], dict[str, list[str]]]:
        """``(plan, model state dict on meta, tie groups)``; the plan is cached per model structure."""
        state = model.state_dict(keep_vars=True)
        shapes = {n: tuple(t.shape) for n, t in state.items()}
        key = tuple(shapes.items())
        groups: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(n)
        ties = {n: names for names in groups.values() if len(names) > 1 for n in names}
        declared = getattr(model, "_tied_weights_keys", None)
        if getattr(model.config, "tie_word_embeddings", False) and isinstance(declared, dict):
            # a model built on meta may not have re-tied its parameters yet (version-dependent): use the
            # class's declared target -> source pairs as transformers' tie_weights() does
            for target, source in declared.items():
                if target in shapes and source in shapes and target not in ties:
                    ties[target] = ties[source] = [source, target]
        if key not in self._plans:
            ignore = tuple(re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()))
            keys = [k for k in self.tensors if not k.endswith(SCALE_SUFFIX) and not k.endswith(FP8_AUX_SUFFIXES)]
            self._plans[key] = build_plan(keys, shapes, adapter_for(model), ignore)
        return self._plans[key], state, ties

    def _source_of(self, plan: Plan, name: str, ties: dict[str, list[str]]) -> str:
        """The model name whose stored tensors fill ``name``: itself, or a tied partner that is stored."""
        if not missing_parts(plan, name):
            return name
        return next((n for n in ties.get(name, ()) if not missing_parts(plan, n)), name)

    # ---- validation -------------------------------------------------------------------------------------

    def _part_problem(self, key: str, want: tuple[int, ...]) -> str | None:
        info = self.tensors[key]
        if info.shape != want:
            return f"wrong shape|{key}: stored {list(info.shape)}, expected {list(want)}"
        if info.dtype in FLOAT_DTYPES:
            return None
        if info.dtype not in FP8_DTYPES:
            return f"wrong dtype|{key}: stored {info.dtype}, a float tensor is required"
        block, scale = self.fp8_block(), self.tensors.get(key + SCALE_SUFFIX)
        if block is None:
            return f"wrong dtype|{key}: {info.dtype} but config.json has no fp8 quantization_config with weight_block_size"
        if scale is None:
            return f"missing|{key}{SCALE_SUFFIX} (the block scales of {info.dtype} {key})"
        grid = (*want[:-2], -(-want[-2] // block[0]), -(-want[-1] // block[1]))
        if scale.shape != grid or scale.dtype not in (*FLOAT_DTYPES, torch.float8_e8m0fnu):
            return f"wrong shape|{key}{SCALE_SUFFIX}: stored {scale.dtype} {list(scale.shape)}, expected {list(grid)} " \
                   f"for {block[0]}x{block[1]} blocks"
        return None

    def _problems(self, plan: Plan, names, state, ties) -> list[str]:
        """``"class|message"`` per problem of the model tensors ``names``."""
        out = []
        for name in names:
            src = self._source_of(plan, name, ties)
            lost = missing_parts(plan, src)
            if lost:
                out += [f"missing|{k}" for k in lost]
                continue
            if src in plan.conflicts:
                out.append(f"conflicting|{name}: stored both as " + ", ".join(p.key for p in plan.parts[src][:4]))
                continue
            shape = tuple(state[src].shape)
            for p in plan.parts[src]:
                want = shape if p.expert is None else shape[1:] if p.rows is None else (p.rows[1] - p.rows[0], shape[2])
                msg = self._part_problem(p.key, want)
                if msg:
                    out.append(msg)
        return out

    def _raise(self, problems: list[str], model: nn.Module) -> None:
        by_class: dict[str, list[str]] = {}
        for p in problems:
            cls, _, msg = p.partition("|")
            by_class.setdefault(cls, []).append(msg)
        lines = [_listing(c, by_class[c]) for c in ("missing", "wrong shape", "wrong dtype", "conflicting", "unexpected")
                 if c in by_class]
        raise CheckpointError(f"{self.path}: the checkpoint does not match the {type(model).__name__} its config.json "
                              "declares (moeq never random-initializes what is missing):\n" + "\n".join(lines))

    def check_against(self, model_meta: nn.Module) -> None:
        """CheckpointError unless every parameter / persistent buffer of ``model_meta`` (built from this
        config, e.g. by :meth:`build_meta_model`) maps to stored tensors of the right shape and a float (or
        block-FP8 + scale) dtype, and no stored tensor is left over. Tied weights may be stored once."""
        plan, state, ties = self._plan(model_meta)
        problems = self._problems(plan, state, state, ties)
        unpaired = [k for k in self.tensors if k.endswith(SCALE_SUFFIX)
                    and getattr(self.tensors.get(k[: -len(SCALE_SUFFIX)]), "dtype", None) not in FP8_DTYPES]
        problems += [f"unexpected|{k}" for k in plan.unexpected + unpaired]
        if problems:
            self._raise(problems, model_meta)

    # ---- reading ----------------------------------------------------------------------------------------

    def _read_float(self, reader: ShardReader, key: str) -> torch.Tensor:
        t = reader.read(self.tensors[key])
        if t.dtype in FP8_DTYPES:
            t = dequantize_fp8_blocks(t, reader.read(self.tensors[key + SCALE_SUFFIX]), self.fp8_block())
        return t

    def _materialize(self, reader: ShardReader, plan: Plan, src: str, meta: torch.Tensor, dtype, device) -> torch.Tensor:
        dtype = dtype or meta.dtype
        parts = plan.parts[src]
        where = str(self.tensors[parts[0].key].file)
        if parts[0].expert is None:
            t = self._read_float(reader, parts[0].key).to(dtype)
            check_finite(t, parts[0].key, where)
            return t.to(device)
        out = torch.empty(meta.shape, dtype=dtype, device=device)
        for p in parts:  # one expert projection at a time: memory is the fused tensor plus at most one slice
            dst = out[p.expert] if p.rows is None else out[p.expert, p.rows[0] : p.rows[1]]
            if out.device.type == "cpu" and self.tensors[p.key].dtype == dtype:
                reader.read(self.tensors[p.key], out=dst)  # straight into the stack: no copy, no temporary
            else:
                dst.copy_(self._read_float(reader, p.key).to(dtype))
            check_finite(dst, p.key, str(self.tensors[p.key].file))
        return out

    def load_module(self, prefix: str, model_meta: nn.Module, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one submodule, read from the shards that hold them (nothing else is read).

        Args:
            prefix: a module name of ``model_meta`` (``"model.layers.3"``, ``"lm_head"``; ``""`` = everything).
            model_meta: the model built from this checkpoint's config (parameters may be on meta).
            device: where the returned tensors live.
            dtype: dtype of every returned tensor; None = the dtype ``model_meta`` declares for each.
        Returns:
            full model name (e.g. ``model.layers.3.mlp.experts.gate_up_proj``) -> tensor with the model's shape:
            fused experts ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``; block FP8
            dequantized (in float32, then cast once).
        Raises:
            CheckpointError: no such submodule; any of its tensors missing / mis-shaped / non-float (as in
            :meth:`check_against`); a NaN/Inf (naming the source tensor, its file and the first bad index).
        """
        plan, state, ties = self._plan(model_meta)
        names = [n for n in state if not prefix or n == prefix or n.startswith(prefix + ".")]
        if not names:
            raise CheckpointError(f"{prefix!r}: {type(model_meta).__name__} has no parameter or buffer under that name")
        problems = self._problems(plan, names, state, ties)
        if problems:
            self._raise(problems, model_meta)
        out: dict[str, torch.Tensor] = {}
        with ShardReader() as reader:
            for name in names:
                src = self._source_of(plan, name, ties)
                done = next((out[n] for n in ties.get(name, ()) if n in out), None)
                out[name] = done if done is not None else self._materialize(reader, plan, src, state[src], dtype, device)
            self.last_bytes_read = reader.bytes_read
        return out


def open_source(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[SourceCheckpoint, nn.Module]:
    """Everything checked before work starts: ``(checkpoint, model on the meta device)`` once the checkpoint is
    known not to be quantized already and to hold every tensor of its architecture (see
    :meth:`SourceCheckpoint.check_against`); stream layers with :meth:`SourceCheckpoint.load_module`."""
    sc = SourceCheckpoint(path)
    sc.refuse_if_quantized()
    meta = sc.build_meta_model(dtype)
    sc.check_against(meta)
    return sc, meta


def refuse_quantized_source(path: str | os.PathLike) -> None:
    """CheckpointError when ``path`` is already quantized (moeq, GPTQ, AWQ, compressed-tensors, bitsandbytes,
    ...), saying what it is and what to use instead; returns for full-precision and block-FP8 checkpoints."""
    SourceCheckpoint(path).refuse_if_quantized()


def load_source_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The full-precision model of a validated source checkpoint (:func:`open_source`), every tensor read through
    :meth:`SourceCheckpoint.load_module`: nothing is ever random-initialized, NaN/Inf is refused, block-FP8
    weights are dequantized. The replacement of ``from_pretrained`` for quantization sources (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moeq.io.load import assign_tensor, params_on_meta

    sc, meta = open_source(path, dtype)
    dtype = next(meta.parameters()).dtype  # None resolved as build_meta_model does (the config's dtype)
    config = AutoConfig.from_pretrained(sc.path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with params_on_meta():  # parameters on meta, buffers computed in __init__ (rotary inv_freq) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, t in sc.load_module("", model, device=device).items():
        assign_tensor(model, name, t)
    model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{sc.path}: {len(still_meta)} tensors were not loaded, e.g. {still_meta[:3]}")
    return model.to(device).eval()
