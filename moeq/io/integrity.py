"""What binds a moeq checkpoint together, and the checks that run when one is read.

Every shard's safetensors metadata carries (format version 2):

- ``moeq_config_sha256``: SHA-256 of ``config.json``'s ``quantization_config`` (canonical JSON: sorted keys,
  no whitespace). Editing any of it after saving (a module's ``online_hadamard``, the global ``bits``) is
  caught at load instead of giving wrong logits.
- ``moeq_layout_sha256``: SHA-256 of every tensor's ``name<TAB>dtype<TAB>shape`` line of the whole checkpoint,
  sorted by name: a shard swapped, a tensor added, dropped, re-typed or re-shaped is caught from the headers.
- ``moeq_data_sha256``: SHA-256 of that shard's data section, checked by ``moeq verify`` /
  ``load_quantized(verify=True)`` (reading every byte; the default load checks structure and values only).

Values checked at every load: scales finite and >= 0, zero points below ``2**bits``, every floating tensor
finite. Structure: the ``quantization_config`` fields have the types and ranges moeq writes
(:func:`validate_quantization_config`), shard paths stay inside the checkpoint directory, headers are
consistent with the file sizes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeq_kernels.act_quant import ACT_FORMATS
from moeq_kernels.packing import SUPPORTED_BITS

META_CONFIG, META_LAYOUT, META_DATA = "moeq_config_sha256", "moeq_layout_sha256", "moeq_data_sha256"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or inconsistent with its config (re-exported by ``moeq.io``)."""


@dataclass(frozen=True)
class Header:
    """A safetensors header: metadata, ``name -> (dtype, shape, (begin, end))`` and where the data starts."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]
    data_start: int


def canonical_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def layout_sha256(entries: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """Digest of ``name -> (safetensors dtype, shape)`` over the whole checkpoint."""
    lines = "\n".join(f"{k}\t{d}\t{list(s)}" for k, (d, s) in sorted(entries.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_header(path: Path) -> Header:
    """Parse and check a safetensors header without reading tensor data (the checks of
    :func:`moeq.io.source_tensors.read_header`: length within the file, JSON object, byte ranges consistent
    with dtype and shape and inside the file), in the form the digests use."""
    from moeq.io.source_tensors import ST_DTYPES, read_header as parse

    infos, meta = parse(path)
    names = {v: k for k, v in ST_DTYPES.items()}
    with open(path, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
    tensors = {k: (names[i.dtype], i.shape, (i.start - data_start, i.start - data_start + i.nbytes))
               for k, i in infos.items()}
    return Header(path, {str(k): str(v) for k, v in meta.items()}, tensors, data_start)


def data_sha256(h: Header, chunk: int = 64 * 2**20) -> str:
    """SHA-256 of a shard's data section (the bytes after the header)."""
    digest = hashlib.sha256()
    with open(h.path, "rb") as f:
        f.seek(h.data_start)
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def inside(root: Path, name: str) -> Path:
    """``root / name`` if it resolves inside ``root`` (no absolute paths, ``..`` or symlinks out), else raise."""
    p = Path(name)
    target = (root / p).resolve()
    if p.is_absolute() or root.resolve() not in target.parents:
        raise CheckpointError(f"{root}: the shard index names {name!r}, which is outside the checkpoint directory")
    return target


# ---- quantization_config structure -------------------------------------------------------------------------

def validate_quantization_config(q: dict, where: str) -> None:
    """Raise :class:`CheckpointError` naming the field when ``q`` is not shaped as moeq writes it."""
    _check(isinstance(q.get("modules", {}), dict), where, "modules", "an object")
    _check(isinstance(q.get("linear_modules", {}), dict), where, "linear_modules", "an object")
    for key in ("bits", "group_size"):
        _check(isinstance(q.get(key), int), where, key, "an integer")
    _check(isinstance(q.get("method"), str), where, "method", "a string")
    for name, m in q.get("modules", {}).items():
        f = f"modules[{name!r}]"
        _check(isinstance(m, dict), where, f, "an object")
        for k in ("num_experts", "hidden_dim", "intermediate_dim"):
            _check(isinstance(m.get(k), int) and m[k] > 0, where, f"{f}.{k}", "a positive integer")
        for k in ("gate_up", "down"):
            _spec(m.get(k), where, f"{f}.{k}")
        _check(m.get("scale_dtype") in ("float16", "bfloat16"), where, f"{f}.scale_dtype", "float16 or bfloat16")
        _check(isinstance(m.get("online_hadamard", False), bool), where, f"{f}.online_hadamard", "true or false")
        for k in ("act13", "act2"):
            _act(m.get(k), where, f"{f}.{k}")
        per = m.get("expert_specs")
        if per is not None:
            _check(isinstance(per, list) and len(per) == m["num_experts"], where, f"{f}.expert_specs",
                   f"a list of {m['num_experts']} [gate_up, down] pairs")
            for e, pair in enumerate(per):
                _check(isinstance(pair, list) and len(pair) == 2, where, f"{f}.expert_specs[{e}]", "a [gate_up, down] pair")
                _spec(pair[0], where, f"{f}.expert_specs[{e}][0]")
                _spec(pair[1], where, f"{f}.expert_specs[{e}][1]")
    for name, m in q.get("linear_modules", {}).items():
        f = f"linear_modules[{name!r}]"
        _check(isinstance(m, dict), where, f, "an object")
        _spec(m, where, f)
        for k in ("in_features", "out_features"):
            _check(isinstance(m.get(k), int) and m[k] > 0, where, f"{f}.{k}", "a positive integer")
        _check(isinstance(m.get("bias"), bool), where, f"{f}.bias", "true or false")
        _check(m.get("scale_dtype") in ("float16", "bfloat16"), where, f"{f}.scale_dtype", "float16 or bfloat16")
        _act(m.get("act"), where, f"{f}.act")


def _act(d, where: str, field: str) -> None:
    """An activation spec entry (absent = 16-bit activations): bits 8 or 4, a known format, clip in (0, 1]."""
    if d is None:
        return
    _check(isinstance(d, dict), where, field, "an object with bits, format, clip")
    _check(d.get("format") in ACT_FORMATS, where, f"{field}.format", f"one of {ACT_FORMATS}")
    ok_bits = (8,) if d.get("format") == "fp8_e4m3" else (4, 8)
    _check(d.get("bits") in ok_bits and not isinstance(d.get("bits"), bool), where, f"{field}.bits",
           f"one of {ok_bits} for format {d.get('format')!r}")
    c = d.get("clip")
    _check(isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 < c <= 1.0, where, f"{field}.clip",
           "a number in (0, 1]")


def _spec(d, where: str, field: str) -> None:
    _check(isinstance(d, dict), where, field, "an object with bits, group_size, sym")
    _check(d.get("bits") in SUPPORTED_BITS, where, f"{field}.bits", f"one of {SUPPORTED_BITS}")
    g = d.get("group_size")
    _check(isinstance(g, int) and (g == -1 or g > 0), where, f"{field}.group_size", "a positive integer or -1")
    _check(isinstance(d.get("sym"), bool), where, f"{field}.sym", "true or false")


def _check(ok: bool, where: str, field: str, expected: str) -> None:
    if not ok:
        raise CheckpointError(f"{where}: quantization_config.{field} must be {expected}")


# ---- tensor values ----------------------------------------------------------------------------------------

def check_values(key: str, t: torch.Tensor, bits: int | None = None) -> None:
    """Scales (``*.scales``) finite and >= 0, zero points (``*.qzeros``) < ``2**bits``, floats finite."""
    if key.endswith(".qzeros") and bits is not None:
        bad = t.to(torch.int32) >= (1 << bits)
        if bool(bad.any()):
            raise CheckpointError(f"{key}: zero point {int(t.flatten()[_first(bad)])} at index {_index(t, bad)} is out "
                                 f"of range for {bits}-bit codes")
    if not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if key.endswith(".scales"):
        bad |= t < 0
    if bool(bad.any()):
        raise CheckpointError(f"{key}: {'invalid scale' if key.endswith('.scales') else 'non-finite value'} "
                             f"{float(t.flatten()[_first(bad)])} at index {_index(t, bad)}")


def _first(mask: torch.Tensor) -> int:
    return int(mask.flatten().nonzero()[0, 0])


def _index(t: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
    flat = _first(mask)
    idx = []
    for d in reversed(t.shape):
        idx.append(flat % d)
        flat //= d
    return tuple(reversed(idx))


# ---- binding config <-> tensors -------------------------------------------------------------------------

def check_binding(q: dict, headers: list[Header], where: str) -> bool:
    """Raise unless the shards' digests match ``q`` and their headers; False for a format-1 checkpoint,
    which has no digests to check (written before they existed)."""
    if q.get("format_version", 0) < 2:
        return False
    for key in (META_CONFIG, META_LAYOUT):
        seen = {h.metadata.get(key) for h in headers}
        if None in seen:
            bad = next(h.path for h in headers if key not in h.metadata)
            raise CheckpointError(f"{bad}: no {key} in the safetensors metadata (a format-2 moeq shard always has "
                                  "one: the file was rewritten by another tool or replaced)")
        if len(seen) > 1:
            raise CheckpointError(f"{where}: the shards disagree on {key}: they come from different saves")
    if headers[0].metadata[META_CONFIG] != canonical_sha256(q):
        raise CheckpointError(f"{where}: config.json's quantization_config is not the one these tensors were saved "
                              "with (edited after saving?); re-quantize, or restore the original config.json")
    entries = {k: (d, s) for h in headers for k, (d, s, _) in h.tensors.items()}
    if headers[0].metadata[META_LAYOUT] != layout_sha256(entries):
        raise CheckpointError(f"{where}: the tensors in the shards are not the ones saved (a shard replaced, or a "
                              "tensor added, removed, re-typed or re-shaped)")
    return True


def bits_for_key(q: dict, key: str) -> int | None:
    """Bit width of the packed tensor ``key`` from the config (None for a tensor that is not packed)."""
    mod, _, _field = key.rpartition(".")
    if mod in q.get("linear_modules", {}):
        return q["linear_modules"][mod]["bits"]
    parts = key.rsplit(".", 3)
    m = q.get("modules", {}).get(parts[0]) if len(parts) == 4 else None
    if m is None or not parts[1].isdigit():
        return None
    which = 1 if parts[2] == "down_proj" else 0
    per = m.get("expert_specs")
    e = int(parts[1])
    if per is not None and e < len(per):
        return per[e][which]["bits"]
    return m["down" if which else "gate_up"]["bits"]


def expected_shape(q: dict, key: str) -> tuple[int, ...] | None:
    """Shape the config implies for packed tensor ``key`` (per-expert or linear), None if not packed."""
    mod, _, field = key.rpartition(".")
    if field not in ("qweight", "scales", "qzeros"):
        return None
    if mod in q.get("linear_modules", {}):
        m = q["linear_modules"][mod]
        return _packed_shape(m["out_features"], m["in_features"], m, field)
    parts = key.rsplit(".", 3)
    m = q.get("modules", {}).get(parts[0]) if len(parts) == 4 else None
    if m is None or not parts[1].isdigit() or parts[2] not in ("gate_proj", "up_proj", "down_proj"):
        return None
    down = parts[2] == "down_proj"
    e = int(parts[1])
    per = m.get("expert_specs")
    spec = per[e][int(down)] if per is not None and e < len(per) else m["down" if down else "gate_up"]
    n, k = (m["hidden_dim"], m["intermediate_dim"]) if down else (m["intermediate_dim"], m["hidden_dim"])
    return _packed_shape(n, k, spec, field)


def _packed_shape(n: int, k: int, spec: dict, field: str) -> tuple[int, int]:
    g = k if spec["group_size"] == -1 else spec["group_size"]
    return (n, k * spec["bits"] // 32) if field == "qweight" else (n, -(-k // g))
