"""The measured dispatch table: ``auto`` picks exactly the measured-best backend at every committed point,
the nearest measured row elsewhere, and the generator reproduces the shipped file.

Runs on CPU: the registry is given stand-in implementations that all accept the call, and the device family is
pinned to the measured one, so only the choice logic is exercised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from moeq_kernels import backends, dispatch
from moeq_kernels.triton import configs

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import make_dispatch_table as gen  # noqa: E402
from benchmarks.shapes import get_shape  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "h100-2026-11-23"


def _measured_points() -> dict:
    """``{(shape, T, hadamard): {backend: us}}`` per source file, read straight from the result JSONs (not through
    the generator): every point where one source timed two or more backends."""
    out = {}
    for f in sorted(RESULTS.glob("layer_bench_run*.json")):
        per = {}
        for r in json.loads(f.read_text())["rows"]:
            if r["impl"].startswith("moeq_") and r.get("us") is not None:
                per.setdefault((r["shape"], r["T"], r["online_hadamard"]), {})[r["backend"]] = r["us"]
        out[f.name] = per
    per = {}
    for r in json.loads((RESULTS / "cuda_check.json").read_text())["bench"]:
        per[(r["model"], r["T"], False)] = {"cuda": r["cuda_us"], "triton": r["triton_us"]}
        per[(r["model"], r["T"], True)] = {"cuda": r["cuda_us_had"], "triton": r["triton_us_had"]}
    out["cuda_check.json"] = per
    return {(name, *point): us for name, pts in out.items() for point, us in pts.items() if len(us) > 1}


def _attrs(shape: str, t: int, hadamard: bool) -> dict:
    s = get_shape(shape)
    return dict(w13_bits=4, w2_bits=4, w13_group_size=128, w2_group_size=128, hidden_dim=s.hidden,
                intermediate_dim=s.intermediate, num_experts=s.num_experts, top_k=s.top_k, num_tokens=t,
                zeros=False, online_hadamard=hadamard, dtype=torch.bfloat16, activation="silu", explicit=False)


@pytest.fixture
def all_runnable(monkeypatch):
    """Every fused_experts backend accepts every call; the GPU is an sm90 (the measured family)."""
    impls = {name: backends.Impl(lambda *a, name=name: name, lambda device, **attrs: None)
             for name in ("cuda", "triton", "reference")}
    monkeypatch.setitem(backends._REGISTRY, "fused_experts", impls)
    monkeypatch.setattr(dispatch, "gpu_family", lambda index: "sm90")
    return impls


def test_every_measured_point_is_dispatched_as_measured(all_runnable):
    points = _measured_points()
    assert len(points) >= 24  # 4 shapes x T in {1, 16} x Hadamard on/off, in two sources
    for (source, shape, t, had), us in points.items():
        best = min(us, key=us.get)
        got = backends.backend_for("fused_experts", "cuda:0", **_attrs(shape, t, had))
        assert got == best, f"{source}: {shape} T={t} hadamard={had} measured {us}, auto chose {got}"


def test_decode_batch_of_16_is_not_sent_to_the_slower_cuda_kernel(all_runnable):
    # The case: at T=16 the CUDA decode kernel measured slower than Triton on every shape.
    for shape in ("Mixtral-8x7B", "Qwen3-30B-A3B", "DeepSeek-V2-Lite", "OLMoE-1B-7B"):
        assert backends.backend_for("fused_experts", "cuda:0", **_attrs(shape, 16, False)) == "triton"
        assert backends.backend_for("fused_experts", "cuda:0", **_attrs(shape, 1, False)) == "cuda"


def test_shipped_table_is_what_the_generator_makes():
    assert gen.render(gen.build_table()) == dispatch.TABLE_PATH.read_text()
    table = dispatch.load_table()
    assert table.provenance["families"] == ["sm90"] and table.provenance["gpus"] == ["NVIDIA H100 80GB HBM3"]
    assert all(Path(REPO / s["file"]).exists() for s in table.provenance["sources"])


def test_triton_rows_name_the_path_the_triton_config_takes():
    # The table's path of a Triton row is what ran; the Triton config lookup must still pick it there.
    for r in dispatch.load_table().rows:
        if r.backend == "triton":
            cfg = configs.select_config(r.num_experts, r.hidden_dim, r.intermediate_dim, r.top_k, r.num_tokens)
            assert cfg.path == r.path, (r.shape, r.num_tokens)


def test_generator_refuses_contradicting_sources():
    a = ("a.json", {("sm90", "X", 1, False): {"cuda": 1.0, "triton": 2.0}})
    b = ("b.json", {("sm90", "X", 1, False): {"cuda": 3.0, "triton": 2.0}})
    with pytest.raises(ValueError, match="contradiction"):
        gen.winners([a, b])
    # a single-backend source is no contradiction: it compared nothing
    assert gen.winners([a, ("c.json", {("sm90", "X", 1, False): {"triton": 0.5}})])[("sm90", "X", 1, False)][0] == "cuda"


def _row(shape, e, h, i, k, t, backend, had=False, family="sm90"):
    other = "triton" if backend == "cuda" else "cuda"
    return dict(family=family, shape=shape, num_experts=e, hidden_dim=h, intermediate_dim=i, top_k=k, num_tokens=t,
                online_hadamard=had, backend=backend, path="x", us={backend: 1.0, other: 2.0}, source="test")


TOY = dispatch.parse_table({"version": 1, "op": "fused_experts", "rows": [
    _row("big", 8, 4096, 14336, 2, 1, "cuda"), _row("big", 8, 4096, 14336, 2, 16, "triton"),
    _row("big", 8, 4096, 14336, 2, 128, "cuda"),
    _row("small", 128, 2048, 768, 8, 1, "triton"), _row("small", 128, 2048, 768, 8, 16, "cuda"),
    _row("small", 128, 2048, 768, 8, 1, "cuda", had=True),
    _row("old", 8, 4096, 14336, 2, 1, "triton", family="sm80"),
]})


def _pick(t, family="sm90", **dims):
    attrs = {**dict(num_experts=8, hidden_dim=4096, intermediate_dim=14336, top_k=2, num_tokens=t), **dims}
    return dispatch.nearest_row(TOY, family, attrs)


def test_nearest_token_bucket_in_log2_space_ties_to_the_larger():
    assert [(_pick(t).num_tokens) for t in (1, 2, 3, 4, 5, 45, 46, 100, 5000)] == [1, 1, 1, 16, 16, 16, 128, 128, 128]
    assert _pick(0).num_tokens == 1  # an empty call counts as T = 1


def test_nearest_shape_in_log2_space():
    assert _pick(1).shape == "big"
    assert _pick(1, num_experts=64, hidden_dim=2048, intermediate_dim=1024, top_k=8).shape == "small"
    near_big = dict(num_experts=16, hidden_dim=4096, intermediate_dim=8192, top_k=2)
    assert _pick(1, **near_big).shape == "big"
    # attributes the call does not carry are left out of the distance
    assert dispatch.nearest_row(TOY, "sm90", {"intermediate_dim": 700, "num_tokens": 16}).backend == "cuda"


def test_hadamard_rows_are_preferred_and_otherwise_plain_rows_stand_in():
    small = dict(num_experts=128, hidden_dim=2048, intermediate_dim=768, top_k=8)
    assert _pick(1, **small).backend == "triton"
    assert _pick(1, online_hadamard=True, **small).backend == "cuda"
    # the only Hadamard row is "small", so a Hadamard call on "big" dims takes it
    assert _pick(1, online_hadamard=True).shape == "small"


def test_unknown_family_takes_the_nearest_measured_one():
    assert _pick(1, family="sm86").family == "sm80"  # same major (Ampere) before the numerically nearer sm90
    assert _pick(1, family="sm89").family == "sm80"
    assert _pick(1, family="sm100").family == "sm90"
    assert _pick(1, family="sm70").family == "sm80"
    assert _pick(1, family="sm90").family == "sm90"
    with pytest.raises(ValueError, match="sm<major><minor>"):
        dispatch.nearest_family(TOY, "hopper")


def test_choice_outside_the_runnable_backends_falls_back_to_static_order(all_runnable, monkeypatch):
    attrs = _attrs("Mixtral-8x7B", 1, False)  # measured: cuda
    monkeypatch.setitem(all_runnable, "cuda", backends.Impl(lambda *a: "cuda", lambda device, **a: "not built"))
    assert backends.backend_for("fused_experts", "cuda:0", **attrs) == "triton"
    assert dispatch.choose("fused_experts", "sm90", ["triton", "reference"], attrs) is None
    assert dispatch.choose("hadamard_transform", "sm90", ["cuda", "triton"], attrs) is None  # no table for it


def test_named_backends_are_not_overridden_by_the_table(all_runnable, monkeypatch):
    attrs = _attrs("Mixtral-8x7B", 16, False)  # measured: triton
    assert backends.backend_for("fused_experts", "cuda:0", "cuda", **attrs) == "cuda"
    monkeypatch.setitem(all_runnable, "cuda", backends.Impl(lambda *a: "cuda", lambda device, **a: "too many tokens"))
    with pytest.raises(RuntimeError, match="too many tokens"):
        backends.backend_for("fused_experts", "cuda:0", "cuda", **attrs)


def test_cpu_dispatch_is_unchanged(monkeypatch):
    # Real registry: on a CPU, auto is the reference backend, with or without the Triton interpreter.
    attrs = _attrs("Qwen3-30B-A3B", 1, False)
    for interp in (None, "1"):
        if interp is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", interp)
        assert backends.backend_for("fused_experts", "cpu", **attrs) == "reference"


def test_table_rows_must_name_their_fastest_backend():
    bad = _row("big", 8, 4096, 14336, 2, 1, "cuda")
    bad["us"] = {"cuda": 3.0, "triton": 2.0}
    with pytest.raises(ValueError, match="not the fastest"):
        dispatch.parse_table({"version": 1, "rows": [bad]})
    with pytest.raises(ValueError, match="version"):
        dispatch.parse_table({"version": 0, "rows": []})
