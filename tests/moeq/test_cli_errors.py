"""Every user error of the command line is one ``moeq: error: ...`` line with exit status 2, Ctrl-C is exit 130
with one line, and the checks run before any model is loaded."""

import errno
import json

import pytest
import torch

import moeq
from moeq import cli
from moeq.cli import main
from moeq.testing import tiny_model

TEXT = "def add(a, b):\n    return a + b\n\n" * 40


@pytest.fixture(scope="module")
def q_dir(fp_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("q") / "q"
    assert main(["quantize", "--model", str(fp_dir), "--out", str(d), "--group-size", "32"]) == 0
    return d


def _one_line_error(capsys, argv, *needles, rc=2):
    assert main(argv) == rc
    text = capsys.readouterr().err
    # progress bars (loading, layers) may precede it; the error itself is one line, last, without a traceback
    err = [line for line in text.strip().splitlines() if line.startswith("moeq")]
    assert len(err) == 1 and text.strip().endswith(err[0]) and "Traceback" not in text, text
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def _calib(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(TEXT)
    return str(p)


@pytest.mark.parametrize("extra,needle", [
    (["--nsamples", "0", "--method", "gptq"], "--nsamples must be >= 1, got 0"),
    (["--seqlen", "0", "--method", "gptq"], "--seqlen must be >= 1, got 0"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--expert-token-budget", "0"], "--expert-token-budget must be >= 1"),
    (["--hessian-mib", "0", "--method", "gptq"], "--hessian-mib must be >= 1, got 0"),
    (["--hessian-mib", "64", "--mixed-budget", "3.5"], "--hessian-mib applies to the streaming pipeline"),
    (["--override", "model.layers.0.mlp.expert={\"bits\": 8}"], "overrides names 'model.layers.0.mlp.expert'"),
    (["--override", "model.layers.0.mlp.experts.gate={\"bits\": 8}"], "not a module this run quantizes"),
])
def test_bad_options(fp_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "q"
    _one_line_error(capsys, ["quantize", "--model", str(fp_dir), "--out", str(out), "--group-size", "32",
                             "--calib", _calib(tmp_path), *extra], needle)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_calib_device_cuda_without_gpu(fp_dir, tmp_path, capsys):
    _one_line_error(capsys, ["quantize", "--model", str(fp_dir), "--out", str(tmp_path / "q"), "--calib-device",
                             "cuda"], "no CUDA device is available")


def test_out_of_vocabulary_jsonl(fp_dir, tmp_path, capsys):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n" + json.dumps({"input_ids": [4, 99999]}) + "\n")
    _one_line_error(capsys, ["quantize", "--model", str(fp_dir), "--out", str(tmp_path / "q"), "--method", "gptq",
                             "--calib", str(p), "--seqlen", "8"], "token id 99999 (sample 1) is outside the model's vocabulary")


def test_outputs_that_would_lose_data(fp_dir, q_dir, tmp_path, capsys):
    base = ["quantize", "--group-size", "32"]
    _one_line_error(capsys, [*base, "--model", str(fp_dir), "--out", str(fp_dir)], "is the source")
    _one_line_error(capsys, [*base, "--model", str(fp_dir), "--out", str(fp_dir / "q")], "inside the source")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"mine")
    _one_line_error(capsys, [*base, "--model", str(fp_dir), "--out", str(foreign), "--overwrite"], "not empty")
    assert (foreign / "model.safetensors").read_bytes() == b"mine"
    _one_line_error(capsys, [*base, "--model", str(fp_dir), "--out", str(q_dir)], "pass --overwrite")
    _one_line_error(capsys, ["export", "--format", "gptq", str(q_dir), str(q_dir)], "is the source")
    assert main(["verify", str(q_dir)]) == 0


def test_quantized_checkpoint_as_source(q_dir, tmp_path, capsys):
    _one_line_error(capsys, ["quantize", "--model", str(q_dir), "--out", str(tmp_path / "again")],
                    "is already quantized by moeq", "original full-precision model")


def test_malformed_config_in_info_and_export(q_dir, tmp_path, capsys):
    import shutil

    d = shutil.copytree(q_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["linear_modules"] = "oops"
    (d / "config.json").write_text(json.dumps(cfg))
    _one_line_error(capsys, ["info", str(d)], "quantization_config.linear_modules must be an object")
    _one_line_error(capsys, ["export", "--format", "gptq", str(d), str(tmp_path / "x")], "linear_modules")
    (d / "config.json").write_text("{not json")
    _one_line_error(capsys, ["verify", str(d)], "corrupt JSON")


def test_ctrl_c_is_130_with_one_line(q_dir, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_info", interrupted)
    _one_line_error(capsys, ["info", str(q_dir)], "interrupted", rc=130)


def test_full_disk_is_one_line_and_writes_nothing(fp_dir, tmp_path, capsys, monkeypatch):
    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    import moeq.pipeline.stream

    monkeypatch.setattr(moeq.pipeline.stream, "write_safetensors", full)
    out = tmp_path / "q"
    _one_line_error(capsys, ["quantize", "--model", str(fp_dir), "--out", str(out), "--group-size", "32"],
                    "no space left on device", "existing files are unchanged",
                    "0 finished layer(s) are kept in", "run the same command again to continue")
    # only the resumable run's directory (its progress record) is left beside the output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [".q.moeq-partial"]
    monkeypatch.undo()
    assert main(["quantize", "--model", str(fp_dir), "--out", str(out), "--group-size", "32"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_verbose_adds_traceback(fp_dir, tmp_path, capsys):
    assert main(["-v", "quantize", "--model", str(fp_dir), "--out", str(fp_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("moeq: error:")


def test_warnings_for_suspicious_calibration(fp_dir, tmp_path, caplog):
    binary = tmp_path / "c.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    with caplog.at_level("WARNING", logger="moeq.cli"):
        rc = main(["quantize", "--model", str(fp_dir), "--out", str(tmp_path / "q"), "--method", "gptq",
                   "--group-size", "32", "--calib", str(binary), "--nsamples", "2", "--seqlen", "300"])
    assert rc == 0
    assert "does not look like text" in caplog.text
    assert "--seqlen 300 is above the model's max_position_embeddings 256" in caplog.text


def _copy_with(fp_dir, tmp_path, fn):
    """A copy of the source checkpoint with ``fn(tensors)`` applied to its single shard."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = shutil.copytree(fp_dir, tmp_path / "src")
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_source_missing_tensor_is_not_random_filled(fp_dir, tmp_path, capsys):
    d = _copy_with(fp_dir, tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    _one_line_error(capsys, ["quantize", "--model", str(d), "--out", str(tmp_path / "q")],
                    "model.layers.1.self_attn.k_proj.weight")
    assert not (tmp_path / "q").exists()


def test_source_non_finite_named(fp_dir, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(fp_dir / "model.safetensors"), "pt") as f:  # the per-expert or the fused name
        key = next(k for k in sorted(f.keys()) if ".experts.0.up_proj" in k or "experts.gate_up" in k)

    def poison(t):
        t[key].view(-1)[7] = float("nan")
    d = _copy_with(fp_dir, tmp_path, poison)
    line = _one_line_error(capsys, ["quantize", "--model", str(d), "--out", str(tmp_path / "q")], key)
    assert "nan" in line.lower() or "non-finite" in line.lower()


def test_source_truncated_shard(fp_dir, tmp_path, capsys):
    import shutil

    d = shutil.copytree(fp_dir, tmp_path / "src")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _one_line_error(capsys, ["quantize", "--model", str(d), "--out", str(tmp_path / "q")], "model.safetensors")


def test_source_model_equals_from_pretrained(fp_dir):
    from transformers import AutoModelForCausalLM

    from moeq.io.source import load_source_model

    ref = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    got = load_source_model(fp_dir, torch.float32)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)


def test_source_wrong_shape_named(fp_dir, tmp_path, capsys):
    def reshape(t):
        t["model.norm.weight"] = torch.ones(7)
    d = _copy_with(fp_dir, tmp_path, reshape)
    _one_line_error(capsys, ["quantize", "--model", str(d), "--out", str(tmp_path / "q")], "model.norm.weight")


def test_library_refuses_non_finite_weights():
    model = tiny_model("olmoe")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts.down_proj: non-finite weight inf at index \(2, 3, 4\)"):
        moeq.quantize_model(model, moeq.QuantConfig(group_size=32))


def test_calibrate_refuses_existing_out(fp_dir, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    out.write_text("mine\n")
    _one_line_error(capsys, ["calibrate", "--model", str(fp_dir), "--out", str(out), "--nsamples", "1"],
                    "exists; pass --overwrite")
    _one_line_error(capsys, ["calibrate", "--model", str(fp_dir), "--out", str(tmp_path / "d.jsonl"), "--seqlen", "0"],
                    "--seqlen must be >= 1")
    assert out.read_text() == "mine\n"
