"""Export: compressed-tensors (verified with the compressed-tensors library's own decompressor) and GPTQ v1,
under the families' original checkpoint names; refusals name the problem."""

import json

import pytest
import torch
from safetensors import safe_open

import moeq
from moeq.io.export import ExportError, dequantize_gptq, export_checkpoint
from moeq.models import adapter_for
from moeq.testing import TINY_CONFIGS, tiny_model

ct = pytest.importorskip("compressed_tensors")  # a dev dependency: installed by `pip install -e .[dev]`


def _saved(tmp_path, model_type="qwen2_moe", **cfg):
    model = tiny_model(model_type)
    moeq.quantize_model(model, moeq.QuantConfig(**{"group_size": 32, **cfg}))
    moeq.save_quantized(model, tmp_path / "q")
    return model, tmp_path / "q"


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _decompress(t, prefix, scheme_args):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    sd = {k.removeprefix(prefix + "."): v for k, v in t.items() if k.startswith(prefix + ".weight_")}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**scheme_args))
    return PackedQuantizationCompressor.decompress(sd, scheme)["weight"]


@pytest.mark.parametrize("model_type,cfg", [("qwen2_moe", {}), ("mixtral", {"sym": False}), ("olmoe", {"bits": 8})])
def test_compressed_tensors_export_dequantizes_exactly(tmp_path, model_type, cfg):
    model, src = _saved(tmp_path, model_type, **cfg)
    out = export_checkpoint(src, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    args = qc["config_groups"]["group_0"]["weights"]
    ct.quantization.QuantizationConfig.model_validate(qc)  # the library accepts the config
    t = _tensors(out)
    ad = adapter_for(model)
    for idx, block in ad.moe_layers(model):
        ex = ad.experts(block)
        w13, w2 = ex.dequantized(ex.scale_dtype)  # (q - z) * s rounded once to the scale dtype, as the library does
        inter = w2.shape[-1]
        hub = ad.hub_name(ad.experts_name(idx))
        for e in (0, w13.shape[0] - 1):
            gate, up, down = (f"{hub}.{e}.{p}" for p in ad.hub_expert_proj)
            assert torch.equal(_decompress(t, gate, args), w13[e, :inter])
            assert torch.equal(_decompress(t, up, args), w13[e, inter:])
            assert torch.equal(_decompress(t, down, args), w2[e])


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_export_uses_the_original_checkpoint_names(tmp_path, model_type):
    # ground truth: the names transformers itself writes for this family (its save reverts v5 renames)
    fp = tiny_model(model_type)
    fp.save_pretrained(tmp_path / "fp")
    hf_names = {k.rsplit(".", 1)[0] for k in _tensors(tmp_path / "fp")}
    moeq.quantize_model(fp, moeq.QuantConfig(group_size=32))
    moeq.save_quantized(fp, tmp_path / "q")
    out = export_checkpoint(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
    ours = {k.rsplit(".", 1)[0] for k in _tensors(out)}
    assert ours == hf_names


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_export_dequantizes_exactly(tmp_path, sym):
    model, src = _saved(tmp_path, "qwen3_moe", sym=sym, scale_dtype="float16")
    out = export_checkpoint(src, tmp_path / "gptq", "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] == sym
    t = _tensors(out)
    w13, w2 = model.model.layers[1].mlp.experts.dequantized(torch.float32)
    p = "model.layers.1.mlp.experts.2.down_proj"
    deq = dequantize_gptq(t[f"{p}.qweight"], t[f"{p}.scales"], t[f"{p}.qzeros"], t[f"{p}.g_idx"], 4)
    assert t[f"{p}.qweight"].shape == (32 * 4 // 32, 64)  # [K*b/32, N]
    assert torch.equal(deq, w2[2])


def test_online_hadamard_is_refused(tmp_path):
    _, src = _saved(tmp_path, "olmoe", rotation="hadamard", online_hadamard=True)
    with pytest.raises(ExportError, match="online Hadamard"):
        export_checkpoint(src, tmp_path / "ct", "compressed-tensors")


def test_mixed_schemes_refused_where_the_format_needs_one(tmp_path):
    _, src = _saved(tmp_path, "olmoe", overrides={"model.layers.0.mlp.experts.down": {"bits": 8}})
    with pytest.raises(ExportError, match="one scheme per layer"):
        export_checkpoint(src, tmp_path / "ct", "compressed-tensors")
    with pytest.raises(ExportError, match="one scheme for the whole model"):
        export_checkpoint(src, tmp_path / "g", "gptq")


def test_per_layer_schemes_become_config_groups(tmp_path):
    _, src = _saved(tmp_path, "olmoe", overrides={"model.layers.1.mlp.experts": {"bits": 8}})
    qc = json.loads((export_checkpoint(src, tmp_path / "ct", "compressed-tensors") / "config.json").read_text())
    bits = sorted(g["weights"]["num_bits"] for g in qc["quantization_config"]["config_groups"].values())
    assert bits == [4, 8]


def test_bf16_scales_refused_only_if_inexact_for_gptq(tmp_path):
    _, src = _saved(tmp_path, "olmoe")  # bf16 scales of small magnitude convert exactly to fp16
    export_checkpoint(src, tmp_path / "g", "gptq")
