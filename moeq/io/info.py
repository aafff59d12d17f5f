"""Facts about a quantized checkpoint (``moeq info``) and measured tensor memory of a loaded model."""

from __future__ import annotations

import os
from dataclasses import dataclass

from safetensors import SafetensorError, safe_open
from torch import nn

from moeq.io.checkpoint import CheckpointError, read_quantization_config, shard_files
from moeq.io.integrity import check_binding, read_header

_DTYPE_BYTES = {"I32": 4, "U8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I8": 1, "BOOL": 1}


@dataclass
class CheckpointInfo:
    """Sizes of a moeq checkpoint. ``expert_*`` count the routed experts only."""

    path: str
    disk_bytes: int
    expert_bytes: int
    expert_params: int
    other_bytes: int
    num_modules: int
    method: str
    bits: int
    group_size: int
    activations: str = "16-bit"

    @staticmethod
    def describe_activations(q: dict) -> str:
        """``16-bit``, or the activation format with the per-module clip ratios' range and the module counts."""
        specs = [(m[k], "experts") for m in q["modules"].values() for k in ("act13", "act2") if k in m]
        specs += [(m["act"], "linear") for m in q.get("linear_modules", {}).values() if "act" in m]
        if not specs:
            return "16-bit"
        kinds = sorted({f"{'fp8 e4m3' if s['format'] == 'fp8_e4m3' else 'int' + str(s['bits'])}" for s, _ in specs})
        clips = [s["clip"] for s, _ in specs]
        n_exp = sum(1 for m in q["modules"].values() if "act13" in m or "act2" in m)
        n_lin = sum(1 for _, w in specs if w == "linear")
        return (f"{'/'.join(kinds)} per token (dynamic, symmetric), clip {min(clips):.2f}-{max(clips):.2f}; "
                f"{n_exp} experts modules, {n_lin} linears")

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.expert_bytes / max(self.expert_params, 1)

    @property
    def expert_bytes_bf16(self) -> int:
        return 2 * self.expert_params

    def lines(self) -> list[str]:
        mib = 2**20
        return [
            f"checkpoint: {self.path}",
            f"method: {self.method}  default bits: {self.bits}  group size: {self.group_size}  quantized modules: {self.num_modules}",
            f"size on disk: {self.disk_bytes / mib:.2f} MiB",
            f"routed experts: {self.expert_params:,} weights, {self.expert_bytes / mib:.2f} MiB packed "
            f"(bf16: {self.expert_bytes_bf16 / mib:.2f} MiB, {self.expert_bytes_bf16 / max(self.expert_bytes, 1):.2f}x smaller)",
            f"bits per expert weight (incl. scales/zeros): {self.bits_per_weight:.3f}",
            f"other tensors: {self.other_bytes / mib:.2f} MiB",
            f"activations: {self.activations}",
        ]


def _header_bytes(f) -> dict[str, tuple[str, int]]:
    """key -> (dtype, bytes) from a safetensors header, without reading tensor data."""
    out = {}
    try:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                sl = sf.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                dt = sl.get_dtype()
                out[key] = (dt, n * _DTYPE_BYTES.get(dt, 0))
    except SafetensorError as exc:
        raise CheckpointError(f"{f}: corrupt safetensors file ({exc})") from exc
    return out


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read sizes from the files' headers and the quantization_config (no tensor data loaded)."""
    q = read_quantization_config(path)
    files = shard_files(path)
    check_binding(q, [read_header(f) for f in files], str(path))  # never report an edited config's numbers
    prefixes = tuple(name + "." for name in q["modules"])
    expert_bytes = other = 0
    for f in files:
        for key, (_, nb) in _header_bytes(f).items():
            if key.startswith(prefixes):
                expert_bytes += nb
            else:
                other += nb
    params = sum(3 * m["num_experts"] * m["hidden_dim"] * m["intermediate_dim"] for m in q["modules"].values())
    return CheckpointInfo(
        path=str(path), disk_bytes=sum(os.path.getsize(f) for f in files), expert_bytes=expert_bytes,
        expert_params=params, other_bytes=other, num_modules=len(q["modules"]), method=q.get("method", "?"),
        bits=q.get("bits", 0), group_size=q.get("group_size", 0), activations=CheckpointInfo.describe_activations(q),
    )


def tensor_bytes(model: nn.Module, device_type: str | None = None) -> int:
    """Bytes of the distinct storages behind a model's parameters and buffers (measured from the tensors
    themselves; tied weights counted once). ``device_type`` restricts to one device type, e.g. ``"cpu"``."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or (device_type and t.device.type != device_type):
            continue
        st = t.untyped_storage()
        key = (t.device, st.data_ptr())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total
