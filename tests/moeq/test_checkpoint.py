"""save_quantized / load_quantized: identical logits, per-expert layout, meta-device build, clear errors,
and real memory savings measured on a tiny Mixtral."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

import moeq
from moeq.io.checkpoint import CheckpointError
from moeq.io.info import checkpoint_info, tensor_bytes
from moeq.testing import tiny_model

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def _quantized(model_type="qwen2_moe", **cfg):
    model = tiny_model(model_type)
    moeq.quantize_model(model, moeq.QuantConfig(**{"group_size": 32, **cfg}))
    return model


@pytest.mark.parametrize("model_type,cfg", [
    ("qwen2_moe", {}),                       # shared expert + sigmoid gate
    ("deepseek_v3", {"sym": False}),         # dense first layer, asymmetric zeros
    ("mixtral", {"bits": 8, "group_size": -1}),  # 8-bit per-channel
])
def test_roundtrip_identical_logits(tmp_path, model_type, cfg):
    model = _quantized(model_type, **cfg)
    moeq.save_quantized(model, tmp_path)
    loaded = moeq.load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert loaded.config.quantization_config["modules"] == model.config.quantization_config["modules"]


def test_experts_stored_per_expert(tmp_path):
    model = _quantized("qwen2_moe")
    moeq.save_quantized(model, tmp_path)
    ex = model.model.layers[0].mlp.experts
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        gate = f.get_tensor("model.layers.0.mlp.experts.3.gate_proj.qweight")
        up_s = f.get_tensor("model.layers.0.mlp.experts.3.up_proj.scales")
        down = f.get_tensor("model.layers.0.mlp.experts.3.down_proj.qweight")
    i = ex.intermediate_dim
    assert torch.equal(gate, ex.w13_qweight[3, :i]) and torch.equal(up_s, ex.w13_scales[3, i:])
    assert torch.equal(down, ex.w2_qweight[3])
    assert not any("gate_up_proj" in k or "w13_" in k for k in keys)
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert {"method", "bits", "group_size", "sym", "rotation", "overrides", "moeq_version"} <= set(q)


def test_sharded_roundtrip(tmp_path):
    model = _quantized("mixtral")
    moeq.save_quantized(model, tmp_path, max_shard_bytes=64 * 1024)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    with torch.no_grad():
        assert torch.equal(moeq.load_quantized(tmp_path)(IDS).logits, model(IDS).logits)


_RSS_PROBE = """
import resource, sys, torch, moeq
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = moeq.load_quantized(sys.argv[1], dtype=torch.bfloat16)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024)
"""


def test_load_never_materializes_dense_experts(tmp_path):
    # Measured, in a fresh process: loading must grow peak RSS by about the packed bytes, far below the bf16
    # experts (1.2 GiB here) that a load through dense weights would touch.
    import subprocess
    import sys

    h, i, e = 1024, 4096, 8
    model = tiny_model("mixtral", dtype=torch.bfloat16, hidden_size=h, intermediate_size=i, num_local_experts=e,
                       num_attention_heads=8, num_key_value_heads=8)
    moeq.quantize_model(model, moeq.QuantConfig(bits=4, group_size=128, w_clip=False))
    moeq.save_quantized(model, tmp_path)
    bf16_experts = 2 * 3 * e * h * i * model.config.num_hidden_layers
    packed = checkpoint_info(tmp_path).expert_bytes
    del model
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < packed + 0.25 * bf16_experts, (grown, packed, bf16_experts)


def test_memory_drops_as_expected_on_tiny_mixtral(tmp_path):
    # bigger experts than the default tiny config so the experts dominate (as in real models)
    fp = tiny_model("mixtral", hidden_size=256, intermediate_size=512, vocab_size=256, num_local_experts=8)
    fp = fp.to(torch.bfloat16)
    model = copy.deepcopy(fp)
    moeq.quantize_model(model, moeq.QuantConfig(bits=4, group_size=128))
    moeq.save_quantized(model, tmp_path)
    info = checkpoint_info(tmp_path)
    e, h, i, layers = 8, 256, 512, 2
    params = 3 * e * h * i * layers
    theory = params * 4 // 8 + (params // 128) * 2  # 4-bit codes + one bf16 scale per 128 weights
    assert abs(info.expert_bytes - theory) / theory < 0.05
    assert info.expert_params == params
    assert abs(info.bits_per_weight - 4.125) < 0.01

    loaded = moeq.load_quantized(tmp_path)
    fp_bytes, q_bytes = tensor_bytes(fp), tensor_bytes(loaded)
    saved = fp_bytes - q_bytes
    expected = 2 * params - theory  # bf16 experts replaced by packed ones
    assert abs(saved - expected) / expected < 0.05, (fp_bytes, q_bytes)


def _saved(tmp_path):
    model = _quantized("olmoe")
    moeq.save_quantized(model, tmp_path)
    return tmp_path


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        moeq.load_quantized(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        moeq.load_quantized(tmp_path)


def test_corrupt_config_json(tmp_path):
    _saved(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        moeq.load_quantized(tmp_path)


def test_not_a_moeq_checkpoint(tmp_path):
    tiny_model("olmoe").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no moeq quantization_config"):
        moeq.load_quantized(tmp_path)


def test_truncated_safetensors(tmp_path):
    _saved(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        moeq.load_quantized(tmp_path)


def test_missing_weights_file(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        moeq.load_quantized(tmp_path)


def test_missing_packed_tensor(tmp_path):
    model = _quantized("olmoe")
    moeq.save_quantized(model, tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.1.mlp.experts.5.down_proj.scales"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="1 packed tensors missing.*experts.5.down_proj.scales"):
        moeq.load_quantized(tmp_path)


def test_wrong_shape_named(tmp_path):
    model = _quantized("olmoe")
    moeq.save_quantized(model, tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.norm.weight"] = torch.ones(3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight: stored shape"):
        moeq.load_quantized(tmp_path)


def test_save_requires_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="not quantized by moeq"):
        moeq.save_quantized(tiny_model("olmoe"), tmp_path)
