"""Hadamard matrices of order m * 2^k and the ``moeq::hadamard_transform`` op (QuaRot-style rotations).

Supported orders: ``n = m * 2^k`` with ``m in {1, 12, 20, 28, 40, 44}`` (k >= 0). Every matrix is built
here from first principles, lazily, and cached:

* ``H_{2^k}``: Sylvester, ``H[i, j] = (-1)^popcount(i & j)`` (symmetric).
* ``H_12, H_20, H_44``: Paley I from the primes 11, 19, 43 (q = 3 mod 4, order q + 1), in a symmetric
  form: ``H[0, 0] = -1``, ``H[0, j] = H[i, 0] = 1``, and for ``i, j in Z_q``:
  ``H[1 + i, 1 + j] = 1 if i + j = 0 (mod q) else -chi(i + j)`` (chi = Legendre symbol mod q). This is
  the textbook ``I + [[0, 1^T], [-1, Q]]`` with its columns permuted (``j -> -j``) and the first column
  negated, which makes it symmetric.
* ``H_28``: Paley II from the prime 13 (q = 1 mod 4, order 2(q + 1)): ``C (x) [[1, 1], [1, -1]] +
  I (x) [[1, -1], [-1, -1]]`` with ``C = [[0, 1^T], [1, Q]]``, ``Q[i, j] = chi(j - i)`` (symmetric).
* ``H_40``: no Paley construction gives 40 directly (39 is not prime; 19 is not 1 mod 4), and
  ``40 * 2^k = 20 * 2^(k+1)``, so order 40 is the doubling ``H_20 (x) H_2`` and
  :func:`hadamard_factors` always reports the smallest base (``m`` in ``{1, 12, 20, 28, 44}``).
* ``H_n = H_m (x) H_{2^k}`` (Kronecker product, base-m index major: ``i = a * 2^k + b``).

**Every supported H_n is symmetric** (Kronecker products of symmetric matrices), so ``x @ H_n`` and
``x @ H_n^T`` coincide and the orthonormal transform (``scale = 1/sqrt(n)``) is its own inverse.

The op, over the last dim of ``x [..., n]``::

    y = (x @ H_n) * scale,   i.e.  y[..., j] = scale * sum_i x[..., i] * H_n[i, j]

in ``x.dtype`` (float16/bfloat16/float32/float64; accumulation in float32, float64 for float64).
The optional fast-hadamard-transform package (extra ``moeq[hadamard]``) is its own backend,
``fast_hadamard_transform``, for power-of-two sizes only: there its Sylvester matrix equals moeq's, while
its orders 12/20/28/40 use other Hadamard matrices than these. ``benchmarks/gpu_hadamard_check.py`` times it
when installed.

QuaRot usage: rotate activations with ``x @ Q``, ``Q = H_n / sqrt(n)``, and fold ``W <- W @ Q`` into the
weight of the consuming ``nn.Linear`` (``y = x @ W^T`` is unchanged because ``Q @ Q^T = I``).

Real MoE dims and their factorization ``m * 2^k`` (I = expert intermediate, H = hidden):

=============================================  =================  ===============
model                                          I                  H
=============================================  =================  ===============
Mixtral-8x7B                                   14336 = 28 * 512   4096 = 2^12
Mixtral-8x22B                                  16384 = 2^14       6144 = 12 * 512
Qwen3-30B-A3B                                  768 = 12 * 64      2048 = 2^11
Qwen1.5-MoE / DeepSeek-MoE-16B / DS-V2-Lite    1408 = 44 * 32     2048 = 2^11
Qwen2-57B-A14B                                 2560 = 20 * 128    3584 = 28 * 128
DeepSeek-V2                                    1536 = 12 * 128    5120 = 20 * 256
DeepSeek-V3                                    2048 = 2^11        7168 = 28 * 256
OLMoE-1B-7B                                    1024 = 2^10        2048 = 2^11
=============================================  =================  ===============
"""

from __future__ import annotations

import functools
import math
import operator

import torch

from moeq_kernels import backends
from moeq_kernels.reference.hadamard import hadamard_ref

__all__ = ["SUPPORTED_M", "hadamard_factors", "hadamard_matrix", "hadamard_transform", "hadamard_transform_op",
           "supported_hadamard_size"]

SUPPORTED_M = (1, 12, 20, 28, 40, 44)
OP = "hadamard_transform"

# Odd part of n -> the base order used for it (m = 4 * odd part; the 2^2 inside m is not Sylvester).
_BASE_FOR_ODD = {1: 1, 3: 12, 5: 20, 7: 28, 11: 44}
# Base order -> (Paley construction, prime).
_PALEY = {12: ("I", 11), 20: ("I", 19), 28: ("II", 13), 44: ("I", 43)}


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, 2^k)`` with ``n = m * 2^k``, ``m`` the smallest supported base; ValueError if unsupported."""
    try:
        size = None if isinstance(n, bool) else operator.index(n)  # ints and numpy ints; not floats
    except TypeError:
        size = None
    if size is None or size < 1:
        raise ValueError(f"n={n!r} is not m*2^k with m in {{1,12,20,28,40,44}}")
    n = size
    odd = n >> ((n & -n).bit_length() - 1)
    m = _BASE_FOR_ODD.get(odd)
    if m is None or n % m:
        raise ValueError(f"n={n} is not m*2^k with m in {{1,12,20,28,40,44}}")
    return m, n // m


def supported_hadamard_size(n: int) -> bool:
    """True when a Hadamard matrix of order ``n`` is available here (see :func:`hadamard_factors`)."""
    try:
        hadamard_factors(n)
    except ValueError:
        return False
    return True


def _legendre(q: int) -> torch.Tensor:
    """int64 ``[q]``: the Legendre symbol ``chi(a)`` mod the prime ``q`` (0 at a = 0, else +-1)."""
    residues = {(a * a) % q for a in range(1, q)}
    return torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.int64)


def _paley_i(q: int) -> torch.Tensor:
    """Symmetric Paley I matrix of order q + 1 (q prime, q = 3 mod 4), int64 ``[q+1, q+1]``."""
    chi = _legendre(q)
    idx = torch.arange(q)
    s = (idx[:, None] + idx[None, :]) % q
    h = torch.ones(q + 1, q + 1, dtype=torch.int64)
    h[0, 0] = -1
    h[1:, 1:] = torch.where(s == 0, torch.ones_like(s), -chi[s])
    return h


def _paley_ii(q: int) -> torch.Tensor:
    """Paley II matrix of order 2(q + 1) (q prime, q = 1 mod 4), symmetric, int64 ``[2q+2, 2q+2]``."""
    chi = _legendre(q)
    idx = torch.arange(q)
    conf = torch.zeros(q + 1, q + 1, dtype=torch.int64)  # symmetric conference matrix
    conf[0, 1:] = 1
    conf[1:, 0] = 1
    conf[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(conf, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int64), zero)


def _sylvester(p: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order p (a power of two), float64 ``[p, p]``.

    Doubling ``H_2q = [[H_q, H_q], [H_q, -H_q]]`` gives ``H[i, j] = (-1)^popcount(i & j)``.
    """
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h


@functools.lru_cache(maxsize=None)
def _base_matrix(m: int) -> torch.Tensor:
    """``H_m`` for a base order ``m in {1, 12, 20, 28, 44}``, float64 ``[m, m]`` on CPU (cached; do not mutate)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    kind, q = _PALEY[m]
    return (_paley_i(q) if kind == "I" else _paley_ii(q)).to(torch.float64)


@functools.lru_cache(maxsize=4)  # dense: 1.6 GB at n = 14336
def _hadamard_cpu64(n: int) -> torch.Tensor:
    m, p = hadamard_factors(n)
    return torch.kron(_base_matrix(m), _sylvester(p)) if m > 1 else _sylvester(p)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The unnormalized Hadamard matrix ``H_n`` (entries +-1, symmetric), ``[n, n]`` in ``dtype``.

    ``H_n = H_m (x) H_{2^k}`` with ``(m, 2^k) = hadamard_factors(n)``; ``H_n @ H_n^T = n * I``. Returns a
    fresh copy (the float64 CPU original is cached per ``n``); dense, so mind ``8 n^2`` bytes in float64.
    """
    return _hadamard_cpu64(n).to(device=device, dtype=dtype, copy=True)


@torch.library.custom_op("moeq::hadamard_transform", mutates_args=())
def hadamard_transform_op(x: torch.Tensor, scale: float, backend: str = "auto") -> torch.Tensor:
    """``(x @ H_n) * scale`` over the last dim of ``x [..., n]``; same shape and dtype as ``x``, contiguous.

    ``backend``: ``"auto"`` or a name from :data:`moeq_kernels.backends.BACKENDS`.
    """
    n = x.shape[-1]
    hadamard_factors(n)  # a clear ValueError before any backend sees an unsupported size
    attrs = {"n": n, "dtype": x.dtype, "explicit": backend != "auto"}
    return backends.dispatch(OP, x.device, backend, attrs, x, scale)


@hadamard_transform_op.register_fake
def _(x, scale, backend="auto"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_ctx(ctx, inputs, output):
    ctx.scale, ctx.backend = inputs[1], inputs[2]


def _backward(ctx, grad):
    # dL/dx = dL/dy @ H_n^T * scale = dL/dy @ H_n * scale, because every supported H_n is symmetric.
    return hadamard_transform_op(grad.contiguous(), ctx.scale, ctx.backend), None, None


torch.library.register_autograd("moeq::hadamard_transform", _backward, setup_context=_setup_ctx)


def hadamard_transform(x: torch.Tensor, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """``(x @ H_n) * scale`` over the last dim of ``x [..., n]``; ``scale`` defaults to ``1/sqrt(n)``.

    With the default scale the transform is orthonormal and its own inverse. Returns ``x``'s shape and
    dtype (float16/bfloat16/float32/float64), contiguous.
    """
    n = x.shape[-1]
    hadamard_factors(n)  # the size error before 1/sqrt(n) can divide by zero
    return hadamard_transform_op(x, 1.0 / math.sqrt(n) if scale is None else float(scale), backend)


def _reference_impl(x: torch.Tensor, scale: float) -> torch.Tensor:
    return hadamard_ref(x, scale)


backends.register(OP, "reference")(_reference_impl)


FHT_BACKEND = "fast_hadamard_transform"


def fht_supports(device: torch.device, n: int = 0, dtype=None, **attrs) -> str | None:
    """When the optional fast-hadamard-transform package can run a ``hadamard_transform`` call."""
    if torch.device(device).type != "cuda":
        return "fast-hadamard-transform runs on CUDA tensors"
    if n <= 0 or n & (n - 1):
        # its orders 12/20/28/40 use other Hadamard matrices than moeq's Paley ones: results would differ
        return f"n={n}: fast-hadamard-transform is used for power-of-two sizes only (same Sylvester matrix)"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} not supported by fast-hadamard-transform"
    return None


def register_fast_hadamard_transform(module=None) -> bool:
    """Register fast-hadamard-transform (optional extra ``moeq[hadamard]``) as the ``fast_hadamard_transform``
    backend of ``hadamard_transform`` when it is installed. For powers of two its transform is ``x @ H_n * scale``
    with the same Sylvester ``H_n`` as moeq's. ``auto`` prefers moeq's own CUDA kernel when that is built
    (order in :data:`moeq_kernels.backends.BACKENDS`). Returns True if it registered it now (False: not
    installed, or already registered)."""
    if module is None:
        try:
            import fast_hadamard_transform as module
        except ImportError:
            return False
    if FHT_BACKEND in backends.registered(OP):
        return False

    def run(x: torch.Tensor, scale: float) -> torch.Tensor:
        return module.hadamard_transform(x.contiguous(), scale)

    backends.register(OP, FHT_BACKEND, fht_supports)(run)
    return True
