"""The one two-factor tiling rule of the MoE online Hadamard (separate pass and fused prologue)."""

import pytest

from moeq_kernels.hadamard import hadamard_factors, supported_hadamard_size
from moeq_kernels.triton import configs

SIZES = [m << k for m in (1, 12, 20, 28, 40, 44) for k in range(0, 19) if supported_hadamard_size(m << k)]


def _all_splits(n, c_min, c_max):
    """Every (r, c, r_pad, c_pad) candidate, enumerated directly from the definition."""
    p = hadamard_factors(n)[1]
    pow2 = [1 << j for j in range(0, 40)]
    out = []
    for c in pow2:
        if c_min <= c <= p and (c_max is None or c <= c_max) and p % c == 0:
            r = n // c
            r_pad = next(v for v in pow2 if v >= max(r, 16))
            out.append((r, c, r_pad, max(16, c)))
    return out


@pytest.mark.parametrize("n", SIZES)
def test_chosen_split_minimizes_the_documented_cost(n):
    cands = [s for s in _all_splits(n, 1, None) if s[2] * s[3] <= configs.MAX_ROTATION_TILE]
    if cands:
        best = min(cands, key=lambda s: (s[2] + s[3], s[2] * s[3], s[1]))
        plan = configs.rotation_plan(n)
        assert (plan.r, plan.c, plan.r_pad, plan.c_pad) == best
    else:
        with pytest.raises(ValueError, match="padded values per row"):
            configs.rotation_plan(n)
    fused = _all_splits(n, 16, configs.FUSED_MAX_C)
    if fused:
        best = min(fused, key=lambda s: (s[2] + s[1], s[1]))
        plan = configs.fused_rotation_plan(n)
        assert (plan.r, plan.c, plan.r_pad, plan.rb) == (*best[:3], configs.FUSED_ROW_BLOCK)
    else:
        with pytest.raises(ValueError, match="under 16"):
            configs.fused_rotation_plan(n)


def test_pass_and_fused_agree_where_both_may_use_the_same_factor():
    # One rule: where the pass's choice is a legal fused factor (16 <= c <= FUSED_MAX_C), the fused kernel
    # tiles the row the same way.
    same = 0
    for n in SIZES:
        try:
            plan = configs.rotation_plan(n)
        except ValueError:
            continue
        if 16 <= plan.c <= configs.FUSED_MAX_C:
            fused = configs.fused_rotation_plan(n)
            assert (fused.r, fused.c, fused.r_pad) == (plan.r, plan.c, plan.r_pad), n
            same += 1
    assert same >= 20
