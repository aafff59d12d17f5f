"""The hand-made experts forward and statistics of ``benchmarks/act_smoothing_why.py`` against the package's
reference kernel and against closed-form values (the ablation's numbers are only as good as these)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.act_smoothing_why import experts_forward, outlier_stats, rel_mse  # noqa: E402
import moeq  # noqa: E402
from moeq.models import adapter_for  # noqa: E402
from moeq.testing import tiny_model  # noqa: E402


@pytest.mark.parametrize("rotation", [None, "hadamard"])
def test_experts_forward_matches_reference_backend(rotation):
    model = tiny_model("qwen2_moe")
    cfg = moeq.QuantConfig(method="rtn", bits=4, group_size=32, act_bits=4, act_clip=0.9, rotation=rotation,
                           online_hadamard=rotation is not None, backend="reference")
    moeq.quantize_model(model, cfg)
    ad = adapter_for(model)
    _, block = next(iter(ad.moe_layers(model)))
    ex = ad.experts(block)
    assert bool(ex.online_hadamard) == (rotation is not None) and ex.act13 is not None and ex.act2 is not None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, ex.hidden_dim, generator=g)
    e = ex.dequantized(torch.float32)[0].shape[0]
    idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(37)])
    wts = torch.rand(37, 2, generator=g)
    want = ex(x, idx, wts)
    hs: list = []
    got = experts_forward(x, idx, wts, *ex.dequantized(torch.float32), bool(ex.online_hadamard), ex.act13, ex.act2, hs)
    assert rel_mse(got, want) < 1e-10
    assert sum(h.shape[0] for h in hs) == idx.numel()
    # without activation specs the result differs (the specs were really applied above)
    plain = experts_forward(x, idx, wts, *ex.dequantized(torch.float32), bool(ex.online_hadamard), None, None)
    assert rel_mse(plain, want) > 1e-4


def test_outlier_stats_closed_form():
    k = 64
    one_hot = torch.zeros(5, k)
    one_hot[:, 3] = 2.0  # every token: max/rms = sqrt(K)
    assert outlier_stats(one_hot + 0.0)["max_rms"] == pytest.approx(math.sqrt(k))
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(200_000, 4, generator=g, dtype=torch.float64)
    st = outlier_stats(gauss)
    assert st["kurt_mean"] == pytest.approx(3.0, abs=0.05)
    # a channel with rare large spikes has a large kurtosis; the others stay Gaussian
    gauss[::1000, 0] = 30.0
    st = outlier_stats(gauss)
    assert st["kurt_max"] > 50 and st["kurt_mean"] > 10
    assert rel_mse(torch.ones(3) * 1.1, torch.ones(3)) == pytest.approx(0.01)
