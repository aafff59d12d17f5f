"""Checkpoint writes are transactions: an interrupt at any step leaves the complete old or the complete new
checkpoint, never a mix; outputs that would lose data are refused; the same model gives the same bytes."""

import errno
import hashlib

import pytest
import torch
from safetensors.torch import load_file

import moeq
from moeq.io import atomic
from moeq.io.atomic import DestinationError, write_safetensors, write_safetensors_parts
from moeq.io.export import export_checkpoint
from moeq.testing import tiny_model


def _quantized(seed=0, **cfg):
    model = tiny_model("olmoe", seed=seed)
    moeq.quantize_model(model, moeq.QuantConfig(**{"group_size": 32, **cfg}))
    return model


@pytest.fixture(scope="module")
def models():
    return _quantized(0), _quantized(1)  # two different checkpoints: "old" and "new"


def _snapshot(d):
    """Relative path -> sha256 of every file under ``d`` (hidden temporaries included)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _steps(model, tmp_path, **kw):
    """The step names of a save that replaces an existing checkpoint."""
    seen = []
    moeq.save_quantized(model, tmp_path / "probe", **kw)
    moeq.save_quantized(model, tmp_path / "probe", on_step=seen.append, overwrite=True, **kw)
    return seen


def test_writer_is_readable_and_reproducible(tmp_path):
    t = {"b": torch.arange(6, dtype=torch.int32).view(2, 3), "a": torch.randn(3, dtype=torch.bfloat16),
         "c": torch.tensor([1, 2], dtype=torch.uint8), "empty": torch.zeros(0, 4)}
    d1 = write_safetensors(tmp_path / "x.safetensors", t, {"k": "v", "a": "b"})
    d2 = write_safetensors(tmp_path / "y.safetensors", dict(reversed(list(t.items()))), {"a": "b", "k": "v"})
    assert d1 == d2 and (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)


def _layout(t):
    return {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}


def test_parts_writer_gives_the_same_bytes(tmp_path):
    """Written part by part in any order, the file equals the one-go file, digest included."""
    g = torch.Generator().manual_seed(0)
    t = {"w": torch.randn(5, 7, generator=g).to(torch.bfloat16), "q": torch.randint(0, 9, (3, 4), dtype=torch.int32),
         "n": torch.randn(7, generator=g), "z": torch.zeros(0, 2, dtype=torch.uint8)}
    meta = {"k": "v", "digest": "0" * 64}
    d1 = write_safetensors(tmp_path / "one.safetensors", t, meta, digest_key="data")
    parts = iter([{"n": t["n"], "z": t["z"]}, {"w": t["w"]}, {"q": t["q"]}])  # not the file's order
    d2 = write_safetensors_parts(tmp_path / "parts.safetensors", _layout(t), parts, meta, digest_key="data")
    assert d1 == d2 == hashlib.sha256(b"".join(atomic._raw_bytes(t[k]) for k in ("n", "q", "w", "z"))).hexdigest()
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "parts.safetensors").read_bytes()


@pytest.mark.parametrize("parts,match", [
    ([{"a": torch.zeros(2)}], r"no data for \['b'\]"),                                     # a tensor never came
    ([{"a": torch.zeros(3)}, {"b": torch.ones(1)}], r"a torch.float32 \(3,\) does not fit"),  # wrong shape
    ([{"a": torch.zeros(2, dtype=torch.float16)}], "does not fit"),                       # wrong dtype
    ([{"a": torch.zeros(2)}, {"a": torch.zeros(2)}], "written already"),                  # twice
    ([{"c": torch.zeros(1)}], "no such tensor"),                                          # not in the layout
])
def test_parts_writer_refuses_what_the_layout_does_not_hold(tmp_path, parts, match):
    layout = {"a": (torch.float32, (2,)), "b": (torch.float32, (1,))}
    with pytest.raises(ValueError, match=match):
        write_safetensors_parts(tmp_path / "x.safetensors", layout, iter(parts), {})


def test_same_model_same_bytes(models, tmp_path):
    moeq.save_quantized(models[0], tmp_path / "a", max_shard_bytes=32 * 1024)
    moeq.save_quantized(models[0], tmp_path / "b", max_shard_bytes=32 * 1024)
    a, b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert len(a) > 3 and a == b  # several shards + index + config, byte-identical


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_interrupt_at_every_step_leaves_old_or_new(models, tmp_path, monkeypatch, exchange):
    if not exchange:  # the fallback for filesystems without RENAME_EXCHANGE
        monkeypatch.setattr(atomic, "_rename_exchange", lambda a, b: False)
    old, new = models
    dest = tmp_path / "ckpt"
    moeq.save_quantized(old, dest, max_shard_bytes=32 * 1024)
    old_files = _snapshot(dest)
    moeq.save_quantized(new, tmp_path / "ref", max_shard_bytes=32 * 1024)
    new_files = _snapshot(tmp_path / "ref")
    steps = _steps(new, tmp_path, max_shard_bytes=32 * 1024)
    assert {"tmp", "config", "shard0", "shard1", "index", "side_files", "swap", "cleanup"} <= set(steps)
    assert ("swap_rename" in steps) == (not exchange)
    for step in steps:
        def interrupt(name, step=step):
            if name == step:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            moeq.save_quantized(new, dest, max_shard_bytes=32 * 1024, overwrite=True, on_step=interrupt)
        now = _snapshot(dest)
        assert now in (old_files, new_files), step
        # before the swap the old one stays; once it swapped, the new one is complete
        assert now == (new_files if step in ("cleanup",) else old_files), step
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], step  # no temporaries left
        moeq.save_quantized(old, dest, max_shard_bytes=32 * 1024, overwrite=True)  # reset to "old"
    loaded = moeq.load_quantized(dest)
    assert torch.equal(loaded.model.layers[0].mlp.experts.w13_qweight, old.model.layers[0].mlp.experts.w13_qweight)


def test_full_disk_keeps_old(models, tmp_path):
    dest = tmp_path / "ckpt"
    moeq.save_quantized(models[0], dest)
    before = _snapshot(dest)

    def full(name):
        if name == "shard0":
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
    with pytest.raises(OSError) as info:
        moeq.save_quantized(models[1], dest, overwrite=True, on_step=full)
    assert info.value.errno == errno.ENOSPC and _snapshot(dest) == before


def test_hard_kill_between_renames_is_reported(models, tmp_path, monkeypatch):
    # a SIGKILL between the fallback's two renames cannot run any handler: simulate its aftermath
    dest = tmp_path / "ckpt"
    moeq.save_quantized(models[0], dest)
    dest.rename(tmp_path / ".ckpt.moeq-old-1234abcd")
    with pytest.raises(moeq.CheckpointError, match="interrupted replace left the previous checkpoint at .*moeq-old"):
        moeq.load_quantized(dest)


def test_destination_rules(models, tmp_path):
    q = tmp_path / "q"
    moeq.save_quantized(models[0], q)
    with pytest.raises(DestinationError, match="already holds a checkpoint written by moeq; pass --overwrite"):
        moeq.save_quantized(models[1], q)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not empty and is not a checkpoint written by moeq"):
        moeq.save_quantized(models[1], other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    src = tmp_path / "src"
    src.mkdir()
    for dest, what in ((src, "is the source"), (src / "sub", "inside the source"), (tmp_path, "contains the source")):
        with pytest.raises(DestinationError, match=what):
            moeq.save_quantized(models[1], dest, sources=(src,), overwrite=True)


def test_export_onto_its_source_refused_before_writing(models, tmp_path):
    q = tmp_path / "q"
    moeq.save_quantized(models[0], q)
    before = _snapshot(q)
    for dest in (q, q / "ct"):
        with pytest.raises(DestinationError, match="source"):
            export_checkpoint(q, dest, "compressed-tensors", overwrite=True)
    assert _snapshot(q) == before
    export_checkpoint(q, tmp_path / "ct", "compressed-tensors")
    with pytest.raises(DestinationError, match="pass --overwrite"):
        export_checkpoint(q, tmp_path / "ct", "compressed-tensors")
    exported = _snapshot(tmp_path / "ct")

    def interrupt(name):
        if name == "config":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(q, tmp_path / "ct", "compressed-tensors", overwrite=True, on_step=interrupt)
    assert _snapshot(tmp_path / "ct") == exported
