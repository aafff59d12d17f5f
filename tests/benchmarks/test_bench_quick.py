"""CI guard of the benchmark suite: layer_bench and model_bench quick modes run on CPU and report sane results.

Runs both scripts in-process (``main(argv)``) with ``--quick --device cpu`` and a temporary ``--out``; checks the
rows they must produce, that the correctness checks inside them passed, and that the memory they report is
real: measured bytes > 0 and the packed INT4 experts smaller than the bf16 experts of the same shape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import layer_bench, model_bench  # noqa: E402
from benchmarks.shapes import ANCHOR_SHAPES  # noqa: E402


def _run(main, out: Path) -> dict:
    # Another test module sets TRITON_INTERPRET=1 at import; quick mode must stay on the reference backend.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        return main(["--quick", "--device", "cpu", "--out", str(out)])


@pytest.fixture(scope="module")
def layer(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("layer_bench")
    return _run(layer_bench.main, out), out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("model_bench")
    return _run(model_bench.main, out), out


def test_layer_bench_files_and_header(layer):
    payload, out = layer
    on_disk = json.loads((out / "layer_bench.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(payload["rows"]))
    assert "moeq layer benchmark" in (out / "layer_bench.md").read_text()
    header = payload["header"]
    for key in ("device", "torch", "triton", "transformers", "commit", "date"):
        assert header[key], key
    assert header["quick"] and header["device"] == "cpu" and header["copy_bw_measured"] > 0
    assert payload["errors"] == []


def test_layer_bench_rows(layer):
    rows = layer[0]["rows"]
    assert {r["shape"] for r in rows} == {f"{n}-tiny" for n in ANCHOR_SHAPES}
    for shape in ANCHOR_SHAPES:
        for t in (1, 16):
            got = {(r["impl"], r["online_hadamard"]) for r in rows if r["shape"] == f"{shape}-tiny" and r["T"] == t}
            assert got == {("bf16_grouped_mm", None), ("bf16_eager", None), ("moeq_reference", False),
                           ("moeq_reference", True)}, (shape, t, got)
    for r in rows:
        assert "error" not in r, r
        assert r["us"] > 0 and r["timing"] == "CPU (not comparable)"
        assert r["touched"] >= 1 and r["int4_floor_us"] > 0 and r["bf16_floor_us"] > r["int4_floor_us"] / 4
        assert r["resident_bytes"] > 0
        if r["impl"] != "bf16_grouped_mm":
            assert r["check_passed"] is True, r  # moeq vs fp32 reference; eager vs grouped_mm


def test_layer_bench_int4_smaller_than_bf16(layer):
    rows = layer[0]["rows"]
    for shape in {r["shape"] for r in rows}:
        int4 = {r["resident_bytes"] for r in rows if r["shape"] == shape and r["impl"].startswith("moeq_")}
        bf16 = {r["resident_bytes"] for r in rows if r["shape"] == shape and r["impl"].startswith("bf16_")}
        assert len(int4) == len(bf16) == 1
        # 4-bit codes + one bf16 scale per 128 weights vs 16 bits: 3.76x smaller, measured from the tensors.
        assert 3.5 < bf16.pop() / int4.pop() < 4.0


def test_model_bench_quick(model):
    payload, out = model
    assert json.loads((out / "model_bench.json").read_text())["rows"] == json.loads(json.dumps(payload["rows"]))
    (info,) = payload["models"]
    assert "error" not in info, info
    assert len(info["checks"]) == 2 and all(c["passed"] for c in info["checks"]), info["checks"]
    assert info["resident_bytes"] > 0 and 0 < info["experts_int4_bytes"] < info["experts_bf16_bytes"]
    rows = payload["rows"]
    assert {(r["mode"], r["batch"]) for r in rows} == {(m, b) for m in model_bench.MODES for b in (1, 2)}
    for r in rows:
        assert "error" not in r, r
        assert r["tok_s"] > 0 and r["decode_tok_s"] > 0 and r["prefill_ms"] > 0
        assert 0 < r["experts_share"] <= 1
        assert "note" not in r or "not compiled" in r["note"], r  # generated every requested token
