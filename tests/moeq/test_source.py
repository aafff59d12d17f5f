"""SourceCheckpoint: every family's checkpoint (save_pretrained's per-expert hub layout and the fused v5 layout)
streams layer by layer to exactly what from_pretrained loads; every way a source can be wrong is refused
naming the tensor or file; block-FP8 sources dequantize exactly to a dense reference."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moeq
from moeq.io.checkpoint import CheckpointError
from moeq.io.source import SourceCheckpoint, open_source, refuse_quantized_source
from moeq.io.source_tensors import dequantize_fp8_blocks
from moeq.models import adapter_for
from moeq.testing import TINY_CONFIGS, tiny_model

FAMILIES = sorted(TINY_CONFIGS)


def _hub_dir(tmp_path, model_type, **overrides):
    """save_pretrained of a tiny model (transformers v5 writes the per-expert hub layout)."""
    model = tiny_model(model_type, **overrides)
    out = tmp_path / f"{model_type}-hub"
    model.save_pretrained(out)
    return out


def _rewrite(src, dst, edit=None, config_edit=None):
    """Copy checkpoint ``src`` to ``dst`` as one safetensors file, after ``edit(tensors)`` / ``config_edit(cfg)``."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    if config_edit is not None:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _fused_dir(tmp_path, model_type):
    """The same model stored under the v5 module names (fused gate_up_proj / down_proj)."""
    hub = _hub_dir(tmp_path, model_type)
    model = AutoModelForCausalLM.from_pretrained(hub, dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    return _rewrite(hub, tmp_path / f"{model_type}-fused", lambda t: (t.clear(), t.update(sd)))


def _module_prefixes(model):
    ad = adapter_for(model)
    return [f"{ad.layers_path}.{i}" for i in range(len(ad.layers(model)))] + [ad.embed_path, ad.final_norm_path,
                                                                              ad.lm_head_path]


def _load_all_by_layer(sc, meta):
    out = {}
    for prefix in _module_prefixes(meta):
        got = sc.load_module(prefix, meta)
        assert got and all(k == prefix or k.startswith(prefix + ".") for k in got)
        out.update(got)
    return out


@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_layers_equal_from_pretrained(tmp_path, model_type, layout):
    path = _hub_dir(tmp_path, model_type) if layout == "hub" else _fused_dir(tmp_path, model_type)
    sc = SourceCheckpoint(path)
    assert sc.quantized_kind() is None
    refuse_quantized_source(path)
    meta = sc.build_meta_model(torch.float32)
    sc.check_against(meta)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    got = _load_all_by_layer(sc, meta)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_sharded_reads_only_the_layer(tmp_path):
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sc = SourceCheckpoint(tmp_path)
    assert len({t.file for t in sc.tensors.values()}) > 2
    meta = sc.build_meta_model(torch.float32)
    got = sc.load_module("model.layers.1", meta)
    layer_bytes = sum(t.nbytes for k, t in sc.tensors.items() if k.startswith("model.layers.1."))
    assert sc.last_bytes_read == layer_bytes
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in got.items()) and len(got) == 16


def test_tied_lm_head_comes_from_embeddings(tmp_path):
    path = _hub_dir(tmp_path, "qwen3_moe", tie_word_embeddings=True)
    sc = SourceCheckpoint(path)
    assert "lm_head.weight" not in sc.tensors
    meta = sc.build_meta_model(torch.float32)
    sc.check_against(meta)
    head = sc.load_module("lm_head", meta)["lm_head.weight"]
    assert torch.equal(head, sc.load_module("model.embed_tokens", meta)["model.embed_tokens.weight"])


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    model = tiny_model("deepseek_v3", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    sc = SourceCheckpoint(tmp_path)
    meta = sc.build_meta_model()  # dtype from config.json
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).state_dict()
    got = sc.load_module("model.layers.2", meta)
    for k, v in got.items():
        assert v.dtype == ref[k].dtype and torch.equal(v, ref[k]), k
    as_fp32 = sc.load_module("model.layers.2.mlp.experts", meta, dtype=torch.float32)
    assert torch.equal(as_fp32["model.layers.2.mlp.experts.down_proj"], ref["model.layers.2.mlp.experts.down_proj"].float())


# ---- tensors wrong ------------------------------------------------------------------------------------------

def _raises(path, *needles, load=None):
    sc = SourceCheckpoint(path)
    meta = sc.build_meta_model(torch.float32)
    with pytest.raises(CheckpointError) as err:
        sc.load_module(load, meta) if load else sc.check_against(meta)
    for n in needles:
        assert n in str(err.value), str(err.value)
    return str(err.value)


def test_missing_attention_projection(tmp_path):
    key = "model.layers.1.self_attn.o_proj.weight"
    bad = _rewrite(_hub_dir(tmp_path, "mixtral"), tmp_path / "bad", lambda t: t.pop(key))
    _raises(bad, "missing (1)", key)
    _raises(bad, key, load="model.layers.1")
    assert SourceCheckpoint(bad).load_module("model.layers.0", SourceCheckpoint(bad).build_meta_model())


def test_missing_expert_named_in_hub_spelling(tmp_path):
    key = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    bad = _rewrite(_hub_dir(tmp_path, "mixtral"), tmp_path / "bad", lambda t: t.pop(key))
    msg = _raises(bad, key)
    assert "experts.3.w1" not in msg


def test_wrong_shape_and_unexpected(tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
        t["model.layers.0.mlp.experts.1.up_proj.weight"] = torch.zeros(16, 64)
        t["model.layers.0.mlp.mystery.weight"] = torch.zeros(3)
    bad = _rewrite(_hub_dir(tmp_path, "olmoe"), tmp_path / "bad", edit)
    _raises(bad, "wrong shape (2)", "model.layers.0.self_attn.q_proj.weight: stored [32, 64], expected [64, 64]",
            "model.layers.0.mlp.experts.1.up_proj.weight: stored [16, 64], expected [32, 64]",
            "unexpected (1)", "model.layers.0.mlp.mystery.weight")


def test_ignorable_extras_pass(tmp_path):
    """DeepSeek-V3's MTP layer (ignored by its model class, as in transformers) and v4-era rotary caches."""
    extra = {"model.layers.61.mlp.experts.0.gate_proj.weight": torch.zeros(4, 4),
             "model.layers.61.enorm.weight": torch.ones(4), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    path = _rewrite(_hub_dir(tmp_path, "deepseek_v3"), tmp_path / "extra", lambda t: t.update(extra))
    sc, meta = open_source(path, torch.float32)
    assert set(sc.load_module("model.layers.0", meta)) == {k for k in meta.state_dict() if k.startswith("model.layers.0.")}


def test_integer_tensor_refused(tmp_path):
    key = "model.norm.weight"
    bad = _rewrite(_hub_dir(tmp_path, "qwen3_moe"), tmp_path / "bad", lambda t: t.update({key: t[key].to(torch.int32)}))
    _raises(bad, "wrong dtype", key, "torch.int32")


def test_fused_and_per_expert_both_stored(tmp_path):
    fused = _fused_dir(tmp_path, "qwen3_moe")
    hub = load_file(str(tmp_path / "qwen3_moe-hub" / "model.safetensors"))
    extra = {k: v for k, v in hub.items() if "layers.1.mlp.experts.0." in k}
    bad = _rewrite(fused, tmp_path / "bad", lambda t: t.update(extra))
    _raises(bad, "conflicting", "model.layers.1.mlp.experts.gate_up_proj")


@pytest.mark.parametrize("value,key,pos", [
    (float("nan"), "model.layers.1.mlp.experts.2.gate_proj.weight", (5, 7)),
    (float("inf"), "model.layers.1.self_attn.q_proj.weight", (3, 4)),
    (float("-inf"), "model.layers.1.mlp.shared_expert.down_proj.weight", (0, 0)),
])
def test_non_finite_named_with_position(tmp_path, value, key, pos):
    def edit(t):
        t[key][pos] = value
        t[key][pos[0] + 1, pos[1]] = value  # the first one in row-major order is reported
    bad = _rewrite(_hub_dir(tmp_path, "qwen2_moe"), tmp_path / "bad", edit)
    sc = SourceCheckpoint(bad)
    meta = sc.build_meta_model(torch.float32)
    sc.check_against(meta)  # shapes and dtypes are fine; values are checked as they stream in
    sc.load_module("model.layers.0", meta)
    with pytest.raises(CheckpointError, match="non-finite") as err:
        sc.load_module("model.layers.1", meta)
    assert key in str(err.value) and f"index {pos}" in str(err.value) and "2 non-finite" in str(err.value)


# ---- files wrong -------------------------------------------------------------------------------------------

def test_truncated_shard(tmp_path):
    path = _hub_dir(tmp_path, "olmoe")
    shard = path / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="truncated") as err:
        SourceCheckpoint(path)
    assert str(shard) in str(err.value)


@pytest.mark.parametrize("damage", ["length", "json"])
def test_corrupt_header(tmp_path, damage):
    path = _hub_dir(tmp_path, "olmoe")
    shard = path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "length":
        data[:8] = (2**40).to_bytes(8, "little")
    else:
        data[8:16] = b"{{{{:::!"  # the JSON header starts with garbage
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header") as err:
        SourceCheckpoint(path)
    assert str(shard) in str(err.value)


def _index_to(path, name):
    keys = list(load_file(str(path / "model.safetensors")))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_index_naming_files_outside(tmp_path, where):
    path = _hub_dir(tmp_path, "olmoe")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((path / "model.safetensors").read_bytes())  # a readable file: it must still be refused
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}[where]
    if where == "symlink":
        (path / name).symlink_to(outside)
    _index_to(path, name)
    with pytest.raises(CheckpointError, match="outside|relative") as err:
        SourceCheckpoint(path)
    assert "model.safetensors.index.json" in str(err.value) and name in str(err.value)


def test_index_missing_shard_and_bad_config(tmp_path):
    path = _hub_dir(tmp_path, "olmoe")
    _index_to(path, "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        SourceCheckpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: corrupt"):
        SourceCheckpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        SourceCheckpoint(path)


# ---- already quantized -------------------------------------------------------------------------------------

def test_moeq_checkpoint_refused(tmp_path):
    model = tiny_model("qwen2_moe")
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    moeq.save_quantized(model, tmp_path)
    assert SourceCheckpoint(tmp_path).quantized_kind() == "moeq"
    with pytest.raises(CheckpointError, match="already quantized by moeq.*load_quantized"):
        refuse_quantized_source(tmp_path)


@pytest.mark.parametrize("evidence", ["metadata", "keys"])
def test_moeq_checkpoint_without_config_entry_refused(tmp_path, evidence):
    model = tiny_model("mixtral")
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    moeq.save_quantized(model, tmp_path / "q")
    if evidence == "metadata":  # config stripped, shard untouched: its __metadata__ still says moeq
        bad = tmp_path / "q"
        cfg = json.loads((bad / "config.json").read_text())
        del cfg["quantization_config"]
        (bad / "config.json").write_text(json.dumps(cfg))
        kind = "moeq"
    else:  # config and shard metadata stripped: the packed tensor names give it away
        bad = _rewrite(tmp_path / "q", tmp_path / "bad", config_edit=lambda c: c.pop("quantization_config"))
        kind = "packed-integer (qweight/scales)"
    assert SourceCheckpoint(bad).quantized_kind() == kind
    with pytest.raises(CheckpointError, match="already quantized by moeq" if kind == "moeq" else "qweight"):
        refuse_quantized_source(bad)


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors", "bitsandbytes"])
def test_quantized_config_refused(tmp_path, method):
    qc = {"quant_method": method, "bits": 4, "group_size": 128}
    bad = _rewrite(_hub_dir(tmp_path, "qwen3_moe"), tmp_path / "bad", config_edit=lambda c: c.update(quantization_config=qc))
    assert SourceCheckpoint(bad).quantized_kind() == method
    with pytest.raises(CheckpointError, match=f"already quantized \\({method}: .*original unquantized model"):
        refuse_quantized_source(bad)


def test_gptq_keys_without_config_refused(tmp_path):
    bad = _rewrite(_hub_dir(tmp_path, "qwen3_moe"), tmp_path / "bad",
                   lambda t: t.update({"model.layers.0.self_attn.q_proj.g_idx": torch.zeros(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match="already quantized \\(gptq: tensor .*q_proj.g_idx"):
        refuse_quantized_source(bad)


# ---- block FP8 -----------------------------------------------------------------------------------------------

def _dequant_by_blocks(q, s, b0, b1):
    """Independent reference: one block at a time, ``q.float() * s[i, j]``."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[-2]):
        for j in range(s.shape[-1]):
            blk = (..., slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1))
            out[blk] = q[blk].float() * s[..., i : i + 1, j : j + 1]
    return out


def _to_fp8(w, b0, b1):
    """``(q float8_e4m3fn, scale_inv float32)`` per b0 x b1 block of ``w [..., R, C]`` (DeepSeek's recipe: scale =
    block amax / 448, partial edge blocks scaled by what they hold)."""
    r, c = w.shape[-2:]
    s = torch.empty((*w.shape[:-2], -(-r // b0), -(-c // b1)))
    for i in range(s.shape[-2]):
        for j in range(s.shape[-1]):
            blk = w[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            s[..., i, j] = blk.abs().amax(dim=(-2, -1)).clamp_min(1e-12) / 448.0
    q = (w / s.repeat_interleave(b0, -2)[..., :r, :].repeat_interleave(b1, -1)[..., :c]).to(torch.float8_e4m3fn)
    return q, s


def test_dequantize_partial_edge_blocks():
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 300, 200, generator=gen) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, 2, generator=gen) + 0.01
    assert torch.equal(dequantize_fp8_blocks(q, s, (128, 128)), _dequant_by_blocks(q, s, 128, 128))
    with pytest.raises(ValueError, match="expected"):
        dequantize_fp8_blocks(q, s[:, :2], (128, 128))


def _is_fp8_target(key, t):
    return t.dim() >= 2 and ("proj" in key or ".w1." in key or ".w2." in key or ".w3." in key) and "embed" not in key


def _fp8_pair(tmp_path, model_type, block, layout):
    """(fp8 checkpoint, dense checkpoint holding exactly its dequantized values)."""
    src = _hub_dir(tmp_path, model_type) if layout == "hub" else _fused_dir(tmp_path, model_type)
    fp8, dense = {}, {}
    for k, t in load_file(str(src / "model.safetensors")).items():
        if _is_fp8_target(k, t):
            q, s = _to_fp8(t, *block)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            dense[k] = _dequant_by_blocks(q, s, *block)
        else:
            fp8[k] = dense[k] = t
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(block)}
    a = _rewrite(src, tmp_path / "fp8", lambda t: (t.clear(), t.update(fp8)), lambda c: c.update(quantization_config=qc))
    b = _rewrite(src, tmp_path / "dense", lambda t: (t.clear(), t.update(dense)))
    return a, b


@pytest.mark.parametrize("model_type,block,layout", [
    ("deepseek_v3", (128, 128), "hub"),   # DeepSeek-V3's convention; tiny dims make every block a partial edge
    ("deepseek_v3", (16, 16), "hub"),     # many blocks per matrix, partial ones (kv_a_proj_with_mqa: 24 rows)
    ("qwen3_moe", (16, 16), "fused"),     # fused FP8 experts: gate_up_proj + gate_up_proj_scale_inv
])
def test_fp8_source_equals_dense_reference(tmp_path, model_type, block, layout):
    fp8, dense = _fp8_pair(tmp_path, model_type, block, layout)
    sc = SourceCheckpoint(fp8)
    assert sc.quantized_kind() == "fp8" and sc.fp8_block() == block
    refuse_quantized_source(fp8)
    assert sum(t.dtype == torch.float8_e4m3fn for t in sc.tensors.values()) > 10
    meta = sc.build_meta_model(torch.float32)
    sc.check_against(meta)
    ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).state_dict()
    got = _load_all_by_layer(sc, meta)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_fp8_missing_scale_and_nan(tmp_path):
    fp8, _ = _fp8_pair(tmp_path, "deepseek_v3", (16, 16), "hub")
    key = "model.layers.2.mlp.experts.5.down_proj.weight"
    no_scale = _rewrite(fp8, tmp_path / "noscale", lambda t: t.pop(key + "_scale_inv"))
    _raises(no_scale, "missing", key + "_scale_inv")

    def nan(t):
        raw = t[key].view(torch.uint8).clone()
        raw[17, 3] = 0x7F  # e4m3fn NaN
        t[key] = raw.view(torch.float8_e4m3fn)
    _raises(_rewrite(fp8, tmp_path / "nan", nan), key, "index (17, 3)", load="model.layers.2")


def test_fp8_without_block_size_refused(tmp_path):
    fp8, _ = _fp8_pair(tmp_path, "qwen3_moe", (16, 16), "hub")
    cfg = json.loads((fp8 / "config.json").read_text())
    del cfg["quantization_config"]["weight_block_size"]
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="fp8 without weight_block_size"):
        refuse_quantized_source(fp8)
