// Device-side Hadamard transform of rows held in shared memory, shared by the standalone op
// (csrc/hadamard.cu) and the down-projection prologue of the fused decode kernel (csrc/moe_decode.cu), so
// both compute the same function. Reference: moeq_kernels.reference.hadamard.hadamard_ref, matrices from
// moeq_kernels.hadamard.hadamard_matrix.
//
// A row x of length n = m * p (p = 2^k) is viewed as X[m, p], x[a * p + b] = X[a, b] (base-m index major).
// y = x @ (H_m (x) H_p) = vec(H_m^T X H_p):
//   1. Sylvester part: the fast Walsh-Hadamard butterfly over b, in passes of radix 2, 4 or 8 (each
//      thread loads 2^R elements, does R butterfly levels in registers, stores): ceil(k / 3) passes, one
//      __syncthreads each instead of k.
//   2. Base part (m > 1): for every column b, y[a', b] = sum_a H_m[a, a'] X[a, b] with the +-1 entries
//      fixed at compile time (template on m), so it is m^2 FADD/FSUB with no multiplications or table
//      reads. Each column is split over 4 threads (m / 4 outputs each; every Hadamard order m > 2 is a
//      multiple of 4) for parallelism on short rows; each thread streams the m inputs through m / 4
//      accumulators, and the threads of one column read before any writes (a barrier between), since
//      the transform is in place.
// The scale is applied by the last step. fp32 throughout.
//
// Layout: element i of a row lives at row_ptr[layout(i)], so a caller may transform rows kept in its own
// layout. Both callers use NaturalLayout: moe_decode.cu keeps its activations chunk-swizzled for the GEMV,
// but the swizzled address arithmetic in the base pass cost ~25 registers (ptxas) and made the 512-thread
// down kernel spill, so it transforms in natural order and swizzles afterwards.
//
// Requirements: every thread of the block calls hadamard_rows (it contains __syncthreads); blockDim.x is
// a multiple of 4; the rows are fully written and visible (a barrier) before the call; on return the
// result is visible to all threads.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace moeq {
namespace hadamard {

// ---------------------------------------------------------------- base matrices (compile time)

// Legendre symbol of a modulo the prime q: 0, +1 (quadratic residue) or -1.
__host__ __device__ constexpr int legendre(int a, int q) {
  a %= q;
  if (a < 0) a += q;
  if (a == 0) return 0;
  for (int r = 1; r < q; ++r) {
    if ((r * r) % q == a) return 1;
  }
  return -1;
}

// Entry (i, j) of H_m, m in {1, 12, 20, 28, 44}, exactly as moeq_kernels/hadamard.py builds it:
//   12, 20, 44: symmetric Paley I from q = m - 1: H[0][0] = -1, H[0][j] = H[i][0] = 1,
//               H[1+i][1+j] = 1 if (i + j) % q == 0 else -chi((i + j) % q);
//   28:         Paley II from q = 13: conf (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]] with the
//               symmetric conference matrix conf[0][0] = 0, conf[0][b] = conf[a][0] = 1,
//               conf[1+i][1+j] = chi(j - i).
__host__ __device__ constexpr int base_entry(int m, int i, int j) {
  if (m == 1) return 1;
  if (m == 28) {
    const int a = i / 2, x = i % 2, b = j / 2, y = j % 2;
    const int conf = (a == 0 && b == 0) ? 0 : (a == 0 || b == 0) ? 1 : legendre(b - a, 13);
    const int plus = (x & y) ? -1 : 1;
    const int zero = a == b ? ((x == 0 && y == 0) ? 1 : -1) : 0;
    return conf * plus + zero;
  }
  const int q = m - 1;
  if (i == 0 && j == 0) return -1;
  if (i == 0 || j == 0) return 1;
  const int s = (i - 1 + j - 1) % q;
  return s == 0 ? 1 : -legendre(s, q);
}

// (m, log2 p) with n = m * 2^log2p and m the smallest supported base, as hadamard_factors() in Python;
// false when n has no supported order.
__host__ __device__ constexpr bool factor(int64_t n, int& m, int& log2p) {
  if (n < 1) return false;
  int k = 0;
  while ((n & 1) == 0) {
    n >>= 1;
    ++k;
  }
  // Odd part -> base order (the 2^2 inside 12, 20, 28, 44 is part of the Paley matrix, not Sylvester).
  const int base = n == 1 ? 1 : n == 3 ? 12 : n == 5 ? 20 : n == 7 ? 28 : n == 11 ? 44 : 0;
  if (base == 0 || (base > 1 && k < 2)) return false;
  m = base;
  log2p = base > 1 ? k - 2 : k;
  return true;
}

// ---------------------------------------------------------------- layouts

struct NaturalLayout {
  __device__ __forceinline__ int operator()(int i) const { return i; }
};

// ---------------------------------------------------------------- Sylvester passes

// One radix-2^R pass over bits [s, s + R) of b, for `rows` rows of n = m << log2p floats each.
template <int R, class Layout>
__device__ __forceinline__ void butterfly_pass(float* buf, int rows, int row_stride, int m, int log2p, int s,
                                               float post, Layout layout) {
  constexpr int kSize = 1 << R;
  const int tuples_per_block = 1 << (log2p - R);  // tuples per m-block
  const int per_row = m * tuples_per_block;
  const int total = rows * per_row;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int row = idx / per_row;
    const int rem = idx - row * per_row;
    const int a = rem >> (log2p - R);
    const int t = rem & (tuples_per_block - 1);
    const int b = ((t >> s) << (s + R)) | (t & ((1 << s) - 1));  // t with R zero bits inserted at s
    float* rp = buf + static_cast<int64_t>(row) * row_stride;
    const int base = (a << log2p) + b;
    float v[kSize];
#pragma unroll
    for (int u = 0; u < kSize; ++u) v[u] = rp[layout(base + (u << s))];
#pragma unroll
    for (int h = 1; h < kSize; h <<= 1) {
#pragma unroll
      for (int u = 0; u < kSize; ++u) {
        if ((u & h) == 0) {
          const float x = v[u], y = v[u + h];
          v[u] = x + y;
          v[u + h] = x - y;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kSize; ++u) rp[layout(base + (u << s))] = v[u] * post;
  }
}

// ---------------------------------------------------------------- base (H_m) part

// out[i] += H_m[A, Q * M/4 + i] * x for the thread's M/4 outputs (signs are compile-time constants:
// integral_constant forces constant evaluation, so each term is one FADD or FSUB).
template <int M, int Q, int A, int... I>
__device__ __forceinline__ void base_accumulate(float (&out)[M / 4], float x, std::integer_sequence<int, I...>) {
  ((out[I] += (std::integral_constant<int, base_entry(M, A, Q * (M / 4) + I)>::value > 0 ? x : -x)), ...);
}

// Outputs a' in [Q * M/4, (Q + 1) * M/4) of column b: inputs streamed one at a time into M/4
// accumulators, so registers scale with M/4, not M (M = 44 with all inputs live spilled at 512 threads).
template <int M, int Q, class Layout, int... A>
__device__ __forceinline__ void base_quarter(float (&out)[M / 4], const float* rp, int log2p, int b, Layout layout,
                                             std::integer_sequence<int, A...>) {
  const auto outs = std::make_integer_sequence<int, M / 4>{};
  ((base_accumulate<M, Q, A>(out, rp[layout((A << log2p) + b)], outs)), ...);
}

template <int M, class Layout>
__device__ void base_pass(float* buf, int rows, int row_stride, int log2p, float scale, Layout layout) {
  static_assert(M % 4 == 0, "Hadamard orders above 2 are multiples of 4");
  constexpr int kOut = M / 4;
  const int p = 1 << log2p;
  const int cols = rows * p;
  // Each round takes whole columns (all 4 quarters of a column read before any of them writes: a column
  // split across rounds would read values a previous round already overwrote). Within a round the thread
  // index is quarter-major, so a warp shares its quarter (no divergence in the switch below).
  const int cols_per_round = blockDim.x / 4;
  const int rounds = (cols + cols_per_round - 1) / cols_per_round;
  const int q = threadIdx.x / cols_per_round;
  for (int rd = 0; rd < rounds; ++rd) {
    const int col = rd * cols_per_round + threadIdx.x % cols_per_round;
    const bool active = q < 4 && col < cols;
    const int row = col >> log2p, b = col & (p - 1);
    float* rp = buf + static_cast<int64_t>(row) * row_stride;
    float out[kOut];
#pragma unroll
    for (int i = 0; i < kOut; ++i) out[i] = -0.0f;  // -0 + x == x exactly
    if (active) {
      const auto ins = std::make_integer_sequence<int, M>{};
      switch (q) {
        case 0: base_quarter<M, 0>(out, rp, log2p, b, layout, ins); break;
        case 1: base_quarter<M, 1>(out, rp, log2p, b, layout, ins); break;
        case 2: base_quarter<M, 2>(out, rp, log2p, b, layout, ins); break;
        default: base_quarter<M, 3>(out, rp, log2p, b, layout, ins); break;
      }
    }
    __syncthreads();  // every read of this round before any in-place write
    if (active) {
#pragma unroll
      for (int i = 0; i < kOut; ++i) rp[layout(((q * kOut + i) << log2p) + b)] = out[i] * scale;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- whole transform

// In place: row r (r < rows) at buf + r * row_stride becomes (row @ H_n) * scale, n = m << log2p.
// m and log2p come from factor(); m must be 1, 12, 20, 28 or 44.
template <class Layout>
__device__ void hadamard_rows(float* buf, int rows, int row_stride, int m, int log2p, float scale, Layout layout) {
  // Sylvester passes: radix 8 while at least 3 bits remain, then one radix 4 or 2 pass.
  for (int s = 0; s < log2p;) {
    const int r = log2p - s >= 3 ? 3 : log2p - s;
    const float post = (m == 1 && s + r == log2p) ? scale : 1.0f;  // the last step applies the scale
    if (r == 3) {
      butterfly_pass<3>(buf, rows, row_stride, m, log2p, s, post, layout);
    } else if (r == 2) {
      butterfly_pass<2>(buf, rows, row_stride, m, log2p, s, post, layout);
    } else {
      butterfly_pass<1>(buf, rows, row_stride, m, log2p, s, post, layout);
    }
    s += r;
    __syncthreads();
  }
  switch (m) {
    case 12: base_pass<12>(buf, rows, row_stride, log2p, scale, layout); break;
    case 20: base_pass<20>(buf, rows, row_stride, log2p, scale, layout); break;
    case 28: base_pass<28>(buf, rows, row_stride, log2p, scale, layout); break;
    case 44: base_pass<44>(buf, rows, row_stride, log2p, scale, layout); break;
    default:
      if (log2p == 0) {  // n == 1: only the scale
        for (int r = threadIdx.x; r < rows; r += blockDim.x) buf[static_cast<int64_t>(r) * row_stride] *= scale;
        __syncthreads();
      }
      break;
  }
}

}  // namespace hadamard
}  // namespace moeq
