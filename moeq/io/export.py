"""``moeq export``: rewrite a moeq checkpoint for serving engines (vLLM, SGLang) in their formats.

Both formats store every routed expert as its own linear under the family's original (hub) names
(``MoEAdapter.hub_name`` / ``hub_expert_proj``), the names those engines map for expert parallelism.

``compressed-tensors`` (``format: pack-quantized``): per quantized linear ``weight_packed`` int32 ``[N, K*b/32]``
(moeq's ``qweight`` unchanged: the same little-endian bit stream of ``q + 2^(b-1)`` codes), ``weight_scale``
``[N, K/g]``, ``weight_shape`` int64 ``[N, K]`` and, when asymmetric, ``weight_zero_point`` (signed zero
``z - 2^(b-1)`` stored the same way, packed along dim 0: int32 ``[N*b/32, K/g]``). Dequantization
``(q_signed - zp_signed) * s`` equals moeq's ``(q - z) * s`` exactly. One config group per distinct scheme
(each MoE layer uniform: gate/up/down share one scheme, as the engines' fused-MoE kernels need).

``gptq`` (GPTQ v1 checkpoint format): ``qweight`` int32 ``[K*b/32, N]`` (moeq's ``qweight`` transposed),
``scales`` fp16 ``[K/g, N]``, ``qzeros`` int32 ``[K/g, N*b/32]`` holding ``z - 1`` (the v1 convention),
``g_idx`` int32 ``[K]``; bits 2/4/8 only, one scheme for the whole model.

Refused with :class:`ExportError` (naming the module): online Hadamard (neither format can express the
runtime transform), non-uniform schemes where the format needs one, 3-bit GPTQ, bf16 scales that do not
convert exactly to fp16 (GPTQ).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from moeq.io.atomic import CheckpointTransaction, check_destination, write_json, write_safetensors
from moeq.io.checkpoint import FIELDS, INDEX_NAME, PROJ_ROWS, CheckpointError, read_quantization_config, shard_files
from moeq.io.integrity import bits_for_key, check_binding, check_values, expected_shape, read_header
from moeq.models import adapter_for
from moeq_kernels.packing import pack, unpack

logger = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "gptq")
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "vocab.json", "merges.txt")


class ExportError(ValueError):
    """The checkpoint holds something the target format cannot express."""


def _refuse_act_quant(q: dict, fmt: str) -> None:
    """Activation-quantized checkpoints are not exported: a serving engine reading the exported weights would run
    them with 16-bit activations (GPTQ has no activation fields; compressed-tensors' ``input_activations`` would
    need moeq's per-module clip ratios, which it cannot express, and the online Hadamard before the down input)."""
    for kind, entries, keys in (("experts module", q["modules"], ("act13", "act2")),
                                ("linear", q.get("linear_modules", {}), ("act",))):
        for name, m in entries.items():
            if any(k in m for k in keys):
                raise ExportError(f"{name}: {kind} with quantized activations ({', '.join(k for k in keys if k in m)}) "
                                  f"cannot be exported to {fmt}: the format would serve it with 16-bit activations "
                                  "(or without the clip ratios moeq calibrated); export a checkpoint quantized "
                                  "without --act-bits")


def _schemes(q: dict, fmt: str) -> dict[str, dict]:
    """Quantized module name (per projection for experts) -> scheme dict; refuses what ``fmt`` cannot hold."""
    out = {}
    _refuse_act_quant(q, fmt)
    for name, m in q["modules"].items():
        if len({json.dumps(x, sort_keys=True) for x in m.get("expert_specs", [])}) > 1:
            raise ExportError(f"{name}: per-expert mixed bit widths cannot be expressed in {fmt} (one scheme per layer)")
        if m.get("online_hadamard"):
            raise ExportError(f"{name}: online Hadamard on the down projection cannot be expressed in {fmt}; "
                              "quantize with --rotate --no-online-hadamard to export")
        if fmt == "compressed-tensors" and m["gate_up"] != m["down"]:
            raise ExportError(f"{name}: gate_up {m['gate_up']} and down {m['down']} differ; {fmt} MoE layers need "
                              "one scheme per layer")
        out[f"{name}.gate_up"], out[f"{name}.down"] = m["gate_up"], m["down"]
    for name, m in q.get("linear_modules", {}).items():
        if m.get("online_hadamard"):
            raise ExportError(f"{name}: online Hadamard cannot be expressed in {fmt}")
        out[name] = {k: m[k] for k in ("bits", "group_size", "sym")}
    if fmt == "gptq":
        distinct = {json.dumps(s, sort_keys=True) for s in out.values()}
        if len(distinct) > 1:
            raise ExportError(f"gptq checkpoints hold one scheme for the whole model; found {sorted(distinct)}")
        if any(s["bits"] == 3 for s in out.values()):
            raise ExportError("gptq export of 3-bit weights is not supported (GPTQ's 3-bit word layout differs)")
    return out


class _Writer:
    """Maps one moeq tensor (key, tensor) to the target format's tensors under hub names."""

    def __init__(self, q: dict, adapter, fmt: str, schemes: dict):
        self.q, self.adapter, self.fmt, self.schemes = q, adapter, fmt, schemes
        self.experts = q["modules"]
        self.linears = q.get("linear_modules", {})

    def _expert(self, key: str):
        parts = key.rsplit(".", 3)
        if len(parts) == 4 and parts[0] in self.experts and parts[1].isdigit() and parts[2] in PROJ_ROWS and parts[3] in FIELDS:
            return parts
        return None

    def bits(self, key: str) -> int | None:
        return bits_for_key(self.q, key)

    def convert(self, key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        hit = self._expert(key)
        if hit is not None:
            name, e, proj, field = hit
            m = self.experts[name]
            which = "down" if proj == "down_proj" else "gate_up"
            hub_proj = self.adapter.hub_expert_proj[("gate_proj", "up_proj", "down_proj").index(proj)]
            prefix = f"{self.adapter.hub_name(name)}.{e}.{hub_proj}"
            k = m["hidden_dim"] if which == "gate_up" else m["intermediate_dim"]
            return self._field(prefix, field, t, self.schemes[f"{name}.{which}"], k)
        mod, _, field = key.rpartition(".")
        if mod in self.linears and field in FIELDS:
            return self._field(self.adapter.hub_name(mod), field, t, self.schemes[mod], self.linears[mod]["in_features"])
        return {self.adapter.hub_name(key): t}

    def _field(self, prefix: str, field: str, t: torch.Tensor, scheme: dict, k: int) -> dict[str, torch.Tensor]:
        bits, g = scheme["bits"], scheme["group_size"]
        half = 1 << (bits - 1)
        if self.fmt == "compressed-tensors":
            if field == "qweight":
                return {f"{prefix}.weight_packed": t, f"{prefix}.weight_shape": torch.tensor([t.shape[0], k])}
            if field == "scales":
                return {f"{prefix}.weight_scale": t}
            return {f"{prefix}.weight_zero_point": pack(t.T.contiguous(), bits).T.contiguous()}  # codes z, i.e. zp + 2^(b-1)
        if field == "qweight":
            return {f"{prefix}.qweight": t.T.contiguous(), f"{prefix}.g_idx": torch.arange(k, dtype=torch.int32) // g}
        if field == "scales":
            s16 = t.to(torch.float16)
            if not torch.equal(s16.to(t.dtype), t):
                raise ExportError(f"{prefix}: scales do not convert exactly to float16 (gptq stores fp16 scales)")
            out = {f"{prefix}.scales": s16.T.contiguous()}
            if scheme["sym"]:  # symmetric: v1 qzeros hold 2^(b-1) - 1 everywhere
                z = torch.full((t.shape[1], t.shape[0]), half - 1, dtype=torch.uint8)
                out[f"{prefix}.qzeros"] = pack(z, bits)
            return out
        if int(t.min()) < 1:
            raise ExportError(f"{prefix}: a zero point of 0 cannot be stored in the gptq v1 format (z - 1 < 0)")
        return {f"{prefix}.qzeros": pack((t.to(torch.int16) - 1).to(torch.uint8).T.contiguous(), bits)}


def _ct_config(q: dict, adapter, schemes: dict) -> dict:
    groups, by_scheme = {}, {}
    for name, s in schemes.items():
        base = name.rsplit(".", 1)[0] if name.endswith((".gate_up", ".down")) else name
        by_scheme.setdefault(json.dumps(s, sort_keys=True), set()).add(base)
    for i, (sjson, names) in enumerate(sorted(by_scheme.items())):
        s = json.loads(sjson)
        targets = sorted(f"re:^{_re(adapter.hub_name(n))}(\\.\\d+\\.[^.]+)?$" for n in names)
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": {"num_bits": s["bits"], "type": "int", "symmetric": s["sym"], "strategy": "group",
                        "group_size": s["group_size"], "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ["lm_head"], "kv_cache_scheme": None,
            "moeq": {k: q.get(k) for k in ("method", "rotation", "moeq_version")}}


def _re(name: str) -> str:
    return name.replace(".", "\\.")


def _gptq_config(q: dict, schemes: dict) -> dict:
    s = next(iter(schemes.values()))
    return {"quant_method": "gptq", "bits": s["bits"], "group_size": s["group_size"], "sym": s["sym"],
            "desc_act": False, "checkpoint_format": "gptq", "true_sequential": True,
            "moeq": {k: q.get(k) for k in ("method", "rotation", "moeq_version")}}


def export_checkpoint(src: str | Path, out: str | Path, fmt: str, overwrite: bool = False, on_step=None) -> Path:
    """Write ``src`` (a moeq checkpoint) to ``out`` in ``fmt`` (see module docstring), as one transaction
    (:mod:`moeq.io.atomic`: ``out`` must not be or contain ``src``; an existing export needs ``overwrite``).
    Every packed tensor's shape and values are checked against the config before it is converted."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    src = Path(src)
    dest = check_destination(out, [src], overwrite)
    q = read_quantization_config(src)
    files = shard_files(src)
    if not check_binding(q, [read_header(f) for f in files], str(src)):
        logger.warning("%s: older moeq checkpoint without digests; checking shapes against the config only", src)
    config = AutoConfig.from_pretrained(src)
    adapter = adapter_for(config)
    schemes = _schemes(q, fmt)
    writer = _Writer(q, adapter, fmt, schemes)
    weight_map = {}
    with CheckpointTransaction(dest, on_step) as tx:
        for i, f in enumerate(files):
            tx.step(f"shard{i}")
            fname = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            tensors = _convert_file(f, q, writer)
            write_safetensors(tx.dir / fname, tensors, {"format": "pt"})
            weight_map.update({k: fname for k in tensors})
        tx.step("config")
        if len(files) > 1:
            write_json(tx.dir / INDEX_NAME, {"metadata": {}, "weight_map": weight_map})
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"] = (_ct_config(q, adapter, schemes) if fmt == "compressed-tensors"
                                      else _gptq_config(q, schemes))
        write_json(tx.dir / "config.json", cfg)
        for name in _SIDE_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, tx.dir / name)
    logger.info("exported %s to %s (%s, %d tensors)", src, dest, fmt, len(weight_map))
    return dest


def _convert_file(f: Path, q: dict, writer: "_Writer") -> dict[str, torch.Tensor]:
    """One source shard's tensors in the target format, each packed tensor checked against the config."""
    tensors = {}
    try:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                t = sf.get_tensor(key)
                want = expected_shape(q, key)
                if want is not None and tuple(t.shape) != want:
                    raise CheckpointError(f"{key}: stored shape {tuple(t.shape)}, the quantization_config implies "
                                          f"{want}; the config does not describe these tensors")
                check_values(key, t, writer.bits(key))
                tensors.update(writer.convert(key, t))
    except SafetensorError as exc:
        raise CheckpointError(f"{f}: corrupt safetensors file ({exc})") from exc
    return tensors


def dequantize_gptq(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense ``[N, K]`` float32 weight from GPTQ v1 tensors (the format's definition, for verification)."""
    q = unpack(qweight.T.contiguous(), bits).float()            # [N, K]
    z = unpack(qzeros, bits).float() + 1                        # [G, N]
    return (q - z.T[:, g_idx.long()]) * scales.float().T[:, g_idx.long()]
