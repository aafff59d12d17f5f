"""Load validation: the quantization_config is bound to the tensors, values and dtypes are checked, index paths
stay inside the checkpoint, ``moeq verify`` hashes every byte, and malformed configs are named."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moeq
from moeq.io.checkpoint import CheckpointError
from moeq.io.export import export_checkpoint
from moeq.io.info import checkpoint_info
from moeq.io.integrity import read_header
from moeq.io.verify import verify_checkpoint
from moeq.testing import tiny_model

KEY = "model.layers.1.mlp.experts.2.down_proj.scales"


def _save(tmp_path, name="q", **cfg):
    model = tiny_model("olmoe")
    moeq.quantize_model(model, moeq.QuantConfig(**{"group_size": 32, **cfg}))
    return moeq.save_quantized(model, tmp_path / name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("ck"))


@pytest.fixture
def ckpt(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "c")


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite(d, fn, keep_meta=True):
    """Rewrite model.safetensors with ``fn(tensors)`` applied, keeping (or dropping) its metadata."""
    f = d / "model.safetensors"
    with safe_open(str(f), "pt") as sf:
        meta = sf.metadata()
        t = {k: sf.get_tensor(k) for k in sf.keys()}
    fn(t)
    save_file(t, str(f), metadata=meta if keep_meta else None)


def test_good_checkpoint_verifies(ckpt):
    lines = verify_checkpoint(ckpt)
    assert lines[0].endswith("OK") and "data SHA-256 match" in lines[1]
    moeq.load_quantized(ckpt, verify=True)


@pytest.mark.parametrize("edit", [
    lambda q: q["modules"]["model.layers.0.mlp.experts"].update(online_hadamard=True),  # same shapes: wrong logits
    lambda q: q.update(bits=8),                                                          # info would report 8 bits
    lambda q: q["calibration"].update(note="x"),
])
def test_edited_config_refused(ckpt, edit):
    _edit_config(ckpt, edit)
    for fn in (moeq.load_quantized, checkpoint_info, verify_checkpoint):
        with pytest.raises(CheckpointError, match="not the one these tensors were saved with"):
            fn(ckpt)


def test_declared_bits_do_not_match_tensors(ckpt, tmp_path):
    _edit_config(ckpt, lambda q: q["modules"]["model.layers.0.mlp.experts"]["gate_up"].update(bits=8))
    with pytest.raises(CheckpointError, match="stored torch.int32 .* expected torch.int32"):
        moeq.load_quantized(ckpt)
    with pytest.raises(CheckpointError, match="not the one these tensors were saved with"):
        export_checkpoint(ckpt, tmp_path / "ct", "compressed-tensors")


def test_format1_checkpoint_loads_and_export_checks_shapes(ckpt, tmp_path, caplog):
    # an older moeq checkpoint (format 1, no digests) still loads, with a warning
    _rewrite(ckpt, lambda t: None, keep_meta=False)
    _edit_config(ckpt, lambda q: q.update(format_version=1))
    with caplog.at_level("WARNING"):
        moeq.load_quantized(ckpt)
    assert "no digests" in caplog.text
    def all_8bit(q):
        for m in q["modules"].values():
            m["gate_up"]["bits"] = m["down"]["bits"] = 8
    _edit_config(ckpt, all_8bit)
    with pytest.raises(CheckpointError, match="quantization_config implies .* does not describe these tensors"):
        export_checkpoint(ckpt, tmp_path / "ct", "compressed-tensors")


@pytest.mark.parametrize("value,what", [(float("nan"), "invalid scale nan"), (float("inf"), "invalid scale inf"),
                                        (-0.5, "invalid scale -0.5")])
def test_bad_scales_refused(ckpt, value, what):
    def poison(t):
        t[KEY][3, 0] = value
    _rewrite(ckpt, poison)
    with pytest.raises(CheckpointError, match=f"{KEY}: {what} at index \\(3, 0\\)"):
        moeq.load_quantized(ckpt)
    with pytest.raises(CheckpointError, match="content does not match its recorded SHA-256"):
        verify_checkpoint(ckpt)


def test_non_finite_plain_tensor_refused(ckpt):
    def poison(t):
        t["model.norm.weight"][5] = float("nan")
    _rewrite(ckpt, poison)
    with pytest.raises(CheckpointError, match="model.norm.weight: non-finite value nan at index \\(5,\\)"):
        moeq.load_quantized(ckpt)


def test_zero_points_out_of_range(tmp_path):
    d = _save(tmp_path, bits=3, sym=False)
    key = "model.layers.0.mlp.experts.1.gate_proj.qzeros"

    def poison(t):
        t[key][0, 0] = 9  # a 3-bit zero point is at most 7
    _rewrite(d, poison)
    with pytest.raises(CheckpointError, match=f"{key}: zero point 9 at index \\(0, 0\\) is out of range for 3-bit"):
        moeq.load_quantized(d)


def test_wrong_dtype_refused(ckpt):
    def retype(t):
        t[KEY] = t[KEY].float()
    _rewrite(ckpt, retype)
    with pytest.raises(CheckpointError, match=f"{KEY}: stored torch.float32 .* expected torch.bfloat16"):
        moeq.load_quantized(ckpt)


def test_flipped_byte_found_by_verify(ckpt):
    f = ckpt / "model.safetensors"
    h = read_header(f)
    raw = bytearray(f.read_bytes())
    b, _ = h.tensors["model.layers.0.mlp.experts.0.gate_proj.qweight"][2]
    raw[h.data_start + b] ^= 0x10  # a valid code: only the content hash can see it
    f.write_bytes(bytes(raw))
    moeq.load_quantized(ckpt)
    for fn in (verify_checkpoint, lambda d: moeq.load_quantized(d, verify=True)):
        with pytest.raises(CheckpointError, match="content does not match its recorded SHA-256"):
            fn(ckpt)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_outside_directory_refused(tmp_path, target):
    model = tiny_model("olmoe")
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    d = moeq.save_quantized(model, tmp_path / "q", max_shard_bytes=32 * 1024)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = target
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    (tmp_path / "outside.safetensors").write_bytes(b"")
    for fn in (moeq.load_quantized, checkpoint_info):
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            fn(d)


def test_replaced_shard_refused(tmp_path):
    model = tiny_model("olmoe")
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    d = moeq.save_quantized(model, tmp_path / "a", max_shard_bytes=32 * 1024)
    other = tiny_model("olmoe", seed=1)
    moeq.quantize_model(other, moeq.QuantConfig(group_size=32, method="rtn", w_clip=False))
    e = moeq.save_quantized(other, tmp_path / "b", max_shard_bytes=32 * 1024)
    name = sorted(p.name for p in d.glob("model-*.safetensors"))[1]
    (d / name).write_bytes((e / name).read_bytes())
    with pytest.raises(CheckpointError, match="shards disagree|not the ones saved"):
        moeq.load_quantized(d)


@pytest.mark.parametrize("edit,field", [
    (lambda q: q["modules"]["model.layers.0.mlp.experts"].pop("hidden_dim"), "hidden_dim must be a positive integer"),
    (lambda q: q["modules"]["model.layers.0.mlp.experts"]["down"].update(bits=5), "down.bits must be one of"),
    (lambda q: q.update(modules=[1, 2]), "quantization_config.modules must be an object"),
    (lambda q: q.update(bits="4"), "quantization_config.bits must be an integer"),
    (lambda q: q["modules"]["model.layers.1.mlp.experts"].update(scale_dtype="int8"), "scale_dtype must be"),
])
def test_malformed_config_named(ckpt, tmp_path, edit, field):
    _edit_config(ckpt, edit)
    for fn in (moeq.load_quantized, checkpoint_info, lambda d: export_checkpoint(d, tmp_path / "x", "gptq")):
        with pytest.raises(CheckpointError, match=field):
            fn(ckpt)
