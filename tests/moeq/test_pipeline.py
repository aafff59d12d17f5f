"""The streaming pipeline (moeq.pipeline): same tensors and config as quantize_model + save_quantized for
RTN/GPTQ/AGQ (rotation included) on every family, resumable with identical bytes, one pass with smoothing and
8-bit routers, FP8 sources, and refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

import moeq
from moeq.config import QuantConfig
from moeq.io.checkpoint import shard_files
from moeq.io.source import load_source_model
from moeq.pipeline import quantize_checkpoint
from moeq.pipeline.partial import partial_dir
from moeq.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # GPTQ digests are thread-count dependent


def _calib(n=4, seqlen=32):
    return torch.randint(0, 200, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _tensors(path):
    out = {}
    for f in shard_files(path):
        out.update(load_file(str(f)))
    return out


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _in_memory(src, out, config, calib):
    model = load_source_model(src)
    moeq.quantize_model(model, config, calib=calib)
    moeq.save_quantized(model, out)


@pytest.mark.parametrize("model_type,kw", [
    ("qwen2_moe", dict(method="rtn", quantize_linears=["attention", "shared_experts"])),  # linears + shared experts
    ("mixtral", dict(method="agq", sym=False)),                                           # AGQ, zero points
    ("deepseek_v3", dict(method="gptq", rotation="hadamard", online_hadamard=True,
                         quantize_linears=["dense_mlp"])),                                # rotation; a dense layer
    ("qwen3_moe", dict(method="gptq", act_order=True, bits=3)),
    ("olmoe", dict(method="rtn", router_bits=8)),                                         # absmax routers, no calib
    ("mixtral", dict(method="rtn", act_bits=8, act_format="fp8_e4m3", act_clip_search=True)),  # W4A8, clips searched
])
def test_stream_equals_in_memory(tmp_path, model_type, kw):
    """Every tensor and the quantization_config equal today's whole-model path bit for bit."""
    tiny_model(model_type).save_pretrained(tmp_path / "src")
    config = QuantConfig(group_size=32, **kw)
    calib = _calib() if config.method != "rtn" or config.act_clip_search else None
    _in_memory(tmp_path / "src", tmp_path / "mem", config, calib)
    out, report = quantize_checkpoint(tmp_path / "src", tmp_path / "stream", config, calib)
    a, b = _tensors(tmp_path / "mem"), _tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    qa = json.loads((tmp_path / "mem" / "config.json").read_text())
    qb = json.loads((out / "config.json").read_text())
    assert qa == qb
    layers = qb["num_hidden_layers"]
    assert len(shard_files(out)) == layers + 1  # one shard per decoder layer + the rest
    assert len(report.modules) == len([m for m in report.modules if m.rel_error < 0.5]) > 0
    assert not partial_dir(out).exists()
    moeq.load_quantized(out, verify=True)  # digests, every byte's SHA-256, value checks


@pytest.mark.parametrize("kw", [dict(method="rtn"), dict(method="gptq", rotation="hadamard", online_hadamard=True)])
def test_tied_embeddings_stream_equals_in_memory(tmp_path, kw):
    """Tied input/output embeddings: one matrix stored (or untied by rotation), as the whole-model path does."""
    model = tiny_model("qwen3_moe")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "src")
    config = QuantConfig(group_size=32, **kw)
    calib = _calib() if config.method != "rtn" else None
    _in_memory(tmp_path / "src", tmp_path / "mem", config, calib)
    out, _ = quantize_checkpoint(tmp_path / "src", tmp_path / "stream", config, calib)
    a, b = _tensors(tmp_path / "mem"), _tensors(out)
    assert a.keys() == b.keys() and ("lm_head.weight" in b) == ("rotation" in kw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "mem" / "config.json").read_text()) == json.loads((out / "config.json").read_text())


def test_final_shard_holds_one_vocabulary_matrix_at_a_time(tmp_path, monkeypatch):
    """The embeddings and lm_head (0.6 GiB each at Qwen3's vocabulary) are never in memory together while
    the last shard is written (no live tensor of that shape but the one just read); the bytes equal writing
    them in one go."""
    import gc

    import moeq.pipeline.stream as stream

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "src")
    config = QuantConfig(group_size=32, rotation="hadamard", online_hadamard=True)
    shape = tuple(tiny_model("qwen3_moe").lm_head.weight.shape)
    live = []
    load = stream._Reader.load

    def spy(self, model, names):
        load(self, model, names)
        if "lm_head" in names:
            gc.collect()
            live.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta
                            and tuple(o.shape) == shape))
    monkeypatch.setattr(stream._Reader, "load", spy)
    quantize_checkpoint(tmp_path / "src", tmp_path / "a", config)
    assert live == [1]  # lm_head; the embeddings were released before it was read
    monkeypatch.setattr(stream, "write_safetensors_parts",
                        lambda path, layout, parts, meta, digest_key: stream.write_safetensors(
                            path, {k: v for p in parts for k, v in p.items()}, meta, digest_key))
    quantize_checkpoint(tmp_path / "src", tmp_path / "b", config)  # the same tensors, written in one go
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


class _Stop(Exception):
    pass


def _stop_after(k):
    def hook(i):
        if i == k:
            raise _Stop
    return hook


@pytest.mark.parametrize("kw,stop", [
    (dict(method="gptq"), 0),              # inputs of layer 1 come from disk
    (dict(method="rtn", smooth=True), 1),  # smoothing needs activations; resume after the last layer
])
def test_interrupt_and_resume_gives_identical_bytes(tmp_path, kw, stop):
    tiny_model("qwen2_moe").save_pretrained(tmp_path / "src")
    config, calib = QuantConfig(group_size=32, **kw), _calib()
    quantize_checkpoint(tmp_path / "src", tmp_path / "whole", config, calib)
    with pytest.raises(_Stop):
        quantize_checkpoint(tmp_path / "src", tmp_path / "resumed", config, calib, on_layer=_stop_after(stop))
    partial = partial_dir(tmp_path / "resumed")
    assert partial.is_dir() and not (tmp_path / "resumed").exists()
    assert len(json.loads((partial / "progress.json").read_text())["layers"]) == stop + 1
    seen = []
    quantize_checkpoint(tmp_path / "src", tmp_path / "resumed", config, calib, on_layer=seen.append)
    assert seen == list(range(stop + 1, 2))  # only the unfinished layers ran
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")
    assert not partial.exists()


def test_interrupted_final_save_resumes(tmp_path):
    """An interrupt while the digests are patched in leaves a run that finishes with the same bytes."""
    tiny_model("mixtral").save_pretrained(tmp_path / "src")
    config = QuantConfig(group_size=32)
    quantize_checkpoint(tmp_path / "src", tmp_path / "whole", config)

    def on_step(name):
        if name.startswith("patch:model-00002"):
            raise _Stop
    with pytest.raises(_Stop):
        quantize_checkpoint(tmp_path / "src", tmp_path / "out", config, on_step=on_step)
    assert not (tmp_path / "out").exists()
    quantize_checkpoint(tmp_path / "src", tmp_path / "out", config)
    assert _files(tmp_path / "out") == _files(tmp_path / "whole")


def test_other_settings_refuse_the_unfinished_run(tmp_path):
    tiny_model("qwen2_moe").save_pretrained(tmp_path / "src")
    with pytest.raises(_Stop):
        quantize_checkpoint(tmp_path / "src", tmp_path / "out", QuantConfig(group_size=32), on_layer=_stop_after(0))
    with pytest.raises(ValueError, match="other settings .*config.*--restart"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "out", QuantConfig(group_size=32, bits=3))
    out, _ = quantize_checkpoint(tmp_path / "src", tmp_path / "out", QuantConfig(group_size=32, bits=3), restart=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3


@pytest.mark.parametrize("kw", [dict(), dict(rotation="hadamard", online_hadamard=True)])  # smoothing alone; composed
def test_one_pass_smoothing_router_gptq(tmp_path, kw):
    """Smoothing (+ rotation) + KL-aligned 8-bit routers + GPTQ in one pass: every MoE layer is smoothed and
    aligned, the output is a valid checkpoint and close to full precision."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "src")
    config = QuantConfig(method="gptq", group_size=32, bits=8, smooth=True, router_bits=8, **kw)
    out, _ = quantize_checkpoint(tmp_path / "src", tmp_path / "out", config, _calib())
    cal = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]
    assert len(cal["smoothing"]["layers"]) == len(cal["router_alignment"]) == 2
    q = moeq.load_quantized(out, verify=True)
    fp = load_source_model(tmp_path / "src")
    ids = _calib(2, 16)
    with torch.no_grad():
        a, b = fp(ids).logits, q(ids).logits
    assert float((a - b).norm() / a.norm()) < 0.05  # 8-bit weights: smoothing/alignment keep the function


def test_fp8_source_streams_like_its_dense_copy(tmp_path):
    """A block-FP8 checkpoint quantizes exactly like a dense checkpoint of its dequantized values."""
    from test_source import _fp8_pair

    fp8, dense = _fp8_pair(tmp_path, "deepseek_v3", (16, 16), "hub")
    config = QuantConfig(method="gptq", group_size=32)
    a, _ = quantize_checkpoint(fp8, tmp_path / "a", config, _calib(), dtype=torch.float32)
    b, _ = quantize_checkpoint(dense, tmp_path / "b", config, _calib(), dtype=torch.float32)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_refusals_before_any_layer(tmp_path):
    tiny_model("qwen2_moe").save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="gptq need.*calibration"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "out", QuantConfig(method="gptq", group_size=32))
    with pytest.raises(ValueError, match="overrides names"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "out",
                            QuantConfig(group_size=32, overrides={"model.layers.9.mlp.experts": {"bits": 8}}))
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_offloaded_activations_same_bytes_and_resume(tmp_path):
    """Activations kept on disk between layers (one file per sample) give the in-memory run's bytes, also
    when interrupted and resumed; their files are gone at the end."""
    tiny_model("deepseek_v3").save_pretrained(tmp_path / "src")  # 3 layers: a dense one first
    config, calib = QuantConfig(method="gptq", group_size=32), _calib()
    quantize_checkpoint(tmp_path / "src", tmp_path / "mem", config, calib)
    off = tmp_path / "acts"
    with pytest.raises(_Stop):
        quantize_checkpoint(tmp_path / "src", tmp_path / "disk", config, calib, offload_dir=off,
                            on_layer=_stop_after(1))
    assert len(list((off / "disk.moeq-inputs" / "inputs-00002").glob("h*.safetensors"))) == 4  # inputs of layer 2
    quantize_checkpoint(tmp_path / "src", tmp_path / "disk", config, calib, offload_dir=off)
    assert _files(tmp_path / "disk") == _files(tmp_path / "mem")
    assert not any((off / "disk.moeq-inputs").iterdir())


def test_hessian_chunks_same_bytes(tmp_path, monkeypatch):
    """--hessian-mib reaches the layer quantizer, and experts calibrated one per chunk (their inputs recorded
    once, replayed per chunk) give the unchunked run's bytes (AGQ with blended few-token experts: two Hessians
    per such expert)."""
    from moeq.quantizers import gptq_layer

    tiny_model("qwen2_moe").save_pretrained(tmp_path / "src")
    config = QuantConfig(method="agq", group_size=32, min_expert_tokens_frac=0.2, sparse_expert_fallback="blend")
    calib = _calib()
    quantize_checkpoint(tmp_path / "src", tmp_path / "one", config, calib)
    seen, chunked = [], gptq_layer.expert_chunks

    def spy(n, dim, extra, budget, dense=0):
        seen.append(budget)
        return chunked(n, dim, extra, 1)  # one expert per chunk, whatever the budget

    monkeypatch.setattr(gptq_layer, "expert_chunks", spy)
    quantize_checkpoint(tmp_path / "src", tmp_path / "chunked", config, calib, hessian_mib=3)
    assert seen and set(seen) == {3 << 20}
    assert _files(tmp_path / "chunked") == _files(tmp_path / "one")
    # under --offload-dir the recorded expert inputs are files too (removed after each stage)
    from moeq.pipeline import activations

    dirs, init = [], activations.DiskActivations.__init__

    def spy_init(self, directory, fresh=True):
        dirs.append(directory.name)
        init(self, directory, fresh)

    monkeypatch.setattr(activations.DiskActivations, "__init__", spy_init)
    quantize_checkpoint(tmp_path / "src", tmp_path / "chunked_off", config, calib, offload_dir=tmp_path / "acts")
    assert "expert-inputs" in dirs
    assert _files(tmp_path / "chunked_off") == _files(tmp_path / "one")
    assert not any((tmp_path / "acts" / "chunked_off.moeq-inputs").iterdir())
    with pytest.raises(ValueError, match="hessian_mib must be >= 1"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "bad", config, calib, hessian_mib=0)


def test_expert_chunks_respect_budget():
    """Chunks are consecutive, cover every expert once, stay within the budget (two Hessians for all-token
    experts), and hold one expert when one alone exceeds it."""
    from moeq.quantizers.gptq_layer import expert_chunks

    assert expert_chunks(5, 16, set(), 16 * 16 * 4 * 2) == [[0, 1], [2, 3], [4]]
    assert expert_chunks(4, 16, {1}, 16 * 16 * 4 * 2) == [[0], [1], [2, 3]]
    assert expert_chunks(3, 16, set(), 1) == [[0], [1], [2]]
    assert expert_chunks(3, 16, set(), 1 << 30) == [[0, 1, 2]]
    assert expert_chunks(4, 16, set(), 16 * 16 * 4 * 2 + 200, extra=100) == [[0, 1], [2, 3]]
    assert expert_chunks(4, 16, set(), 16 * 16 * 4 * 2 + 199, extra=100) == [[0], [1], [2], [3]]
