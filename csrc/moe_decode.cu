// Decode-path W4A16 fused MoE experts: the CUDA backend of moeq::fused_experts for small T.
//
// Reference: moeq_kernels.reference.experts.fused_experts_ref (semantics in moe_decode.h); tests in
// tests/kernels/test_cuda_moe.py compare against it on fp32-upcast inputs.
//
// Two launches, no host synchronization, no data-dependent allocation (CUDA-graph capturable):
//
// 1. gate_up_kernel, grid (T*k slots, ceil(I / rows_per_cta)), 256 threads. CTA (s, nb) copies x[s / k]
//    into shared memory once (fp32, chunk-swizzled, plus per-32 sums), then its warps stream the packed
//    rows of gate [nb*R, nb*R + R) and the matching up rows of expert ids[s]: a group of `lpr` lanes
//    (8/16/32: picked so the 32-value chunks of a row spread evenly) owns one (gate, up) pair, each lane
//    16-byte loads, kUnroll chunks per row per batch, double-buffered so the next batch is in flight
//    while this one is multiplied; the first batch is issued before the x prologue. fp32 accumulate,
//    shuffle reduction, silu(gate) * up written to h[s] (fp32). Slots are the fastest grid axis, so CTAs
//    of different tokens that hit the same expert rows run together and share them through L2.
// 2. down_kernel, grid (T, ceil(H / rows_per_cta)), 512 threads. CTA (t, nb) loads h of the token's k
//    slots into shared memory (slots_per_pass at a time), applies the online Hadamard there when asked
//    (hadamard_device.cuh; every CTA of the token redoes it: O(I (m + log2 p)) flops per slot against
//    rows_per_cta * I / 2 weight bytes, and the pass's weight rows are prefetched into L2 before it
//    starts, so HBM keeps streaming meanwhile), then lane groups (as in kernel 1, 2 rows each) take
//    (slot, row) items: y = round(W2[e_slot, n] . h_slot) * w_slot into shared memory;
//    the CTA sums them over slots in the fixed order j = 0..k-1 (deterministic, no atomics) and writes
//    out[t, nb block] in the activation dtype.
//
// Dequantization in the inner loop (per 4-bit value: one shift, one LOP3, one FFMA). A nibble q moved to
// mantissa bits 19..22 of 1.0f is f = 1 + q/16 exactly; per 32-value chunk c (always inside one group)
//   sum_k (q_k - z) s x_k = s * (16 * sum_k f_k x_k - (16 + z) * X_c),   X_c = sum_k x_k (precomputed),
// so neither the zero point nor an int->float conversion costs anything per value, and the cancellation
// in the bracket loses only ~3 bits of fp32 (f and q/16 are of the same magnitude).
//
// Limits (moe_decode_unsupported): H, I multiples of 32; group sizes 32 * 2^j dividing K, or K
// (per-channel); shared memory: 4.125 * H bytes (kernel 1) and ~4.16 * I bytes per slot (kernel 2) within
// the device's per-block opt-in limit; the online Hadamard needs I = m * 2^k, m in {1, 12, 20, 28, 40, 44}.
//
// Tuning constants are unmeasured: to tune on H100 (benchmarks/gpu_cuda_check.py times them).

#include "moe_decode.h"

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hadamard_device.cuh"
#include "moe_decode_device.cuh"

namespace moeq {
namespace {

using decode::Batch;
using decode::RowSet;

constexpr int kGateUpThreads = 256;  // unmeasured: to tune on H100
constexpr int kGateUpRounds = 2;     // row groups per warp per CTA; unmeasured
constexpr int kDownThreads = 512;    // many threads for the Hadamard prologue; unmeasured
constexpr int kDownRowsMax = 256;    // cap on H rows per down CTA (sizes the partials buffer)
constexpr int64_t kDownSmemBudget = 100 * 1024;  // h slots held at once; unmeasured
constexpr int64_t kPrefetchBytes = 256 * 1024;    // L2 prefetch per down CTA and pass; unmeasured

// ---------------------------------------------------------------- kernel 1: gate_up + SiLU * up

template <bool kZ>
__global__ void __launch_bounds__(kGateUpThreads) gate_up_kernel(const MoeDecodeParams p, int rows_per_cta,
                                                                  int lpr, int gshift) {
  const int slot = blockIdx.x;
  const int64_t e = decode::load_id(p.topk_ids, p.ids_dtype, slot);
  if (e < 0 || e >= p.num_experts) return;  // sentinel: its h row is never read
  const int H = static_cast<int>(p.hidden_dim), I = static_cast<int>(p.inter_dim);
  const int nch = H / 32, groups = static_cast<int>(H / p.group13);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gpw = 32 / lpr, group = lane / lpr, lig = lane % lpr;
  const int n_begin = blockIdx.y * rows_per_cta;
  const int n_end = min(I, n_begin + rows_per_cta);
  const int row_step = (kGateUpThreads / 32) * gpw;
  const bool sbf16 = p.w13_scale_dtype == FloatDType::kBFloat16;

  extern __shared__ float4 smem[];
  float4* xs = smem;
  float* xsum = reinterpret_cast<float*>(smem + nch * 8);

  // Rows of one (gate, up) pair of expert e: logical rows n and I + n of W13[e].
  auto make_rows = [&](int n) {
    RowSet<2> rs;
    const bool valid = n < n_end;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = e * 2 * I + r * I + n;
      rs.w[r] = valid ? reinterpret_cast<const uint4*>(p.w13_qweight + row * (H / 8)) : nullptr;
      rs.s[r] = static_cast<const uint16_t*>(p.w13_scales) + row * groups;
      rs.z[r] = kZ ? p.w13_qzeros + row * groups : nullptr;
      rs.x[r] = xs;
      rs.xsum[r] = xsum;
    }
    return rs;
  };

  const int n_first = n_begin + warp * gpw;
  RowSet<2> rs = make_rows(n_first + group);
  Batch<2, kZ> cur;
  decode::load_batch<2, kZ>(rs, lig, lpr, nch, gshift, cur);  // in flight during the prologue

  decode::stage_activation(static_cast<const uint16_t*>(p.hidden) + static_cast<int64_t>(slot / p.top_k) * H,
                           p.act_dtype == FloatDType::kBFloat16, nch, xs, xsum);
  __syncthreads();

  const bool abf16 = p.act_dtype == FloatDType::kBFloat16;
  for (int n0 = n_first; n0 < n_end; n0 += row_step) {  // warp-uniform bounds
    const int n = n0 + group;
    if (n0 != n_first) {
      rs = make_rows(n);
      decode::load_batch<2, kZ>(rs, lig, lpr, nch, gshift, cur);
    }
    float acc[2] = {0.0f, 0.0f};
    decode::dot_loop<2, kZ, true>(rs, cur, lig, lpr, nch, gshift, sbf16, acc);
    decode::reduce_group(acc, lpr);
    if (lig == 0 && n < n_end) {
      // The reference rounds gate and up (F.linear), silu(gate) and the product to the activation dtype.
      const float g = decode::round_to(acc[0], abf16), u = decode::round_to(acc[1], abf16);
      const float act = decode::round_to(g / (1.0f + __expf(-g)), abf16);
      p.h[static_cast<int64_t>(slot) * I + n] = decode::round_to(act * u, abf16);
    }
  }
}

// ---------------------------------------------------------------- kernel 2: [Hadamard] + down + sum

template <bool kZ>
__global__ void __launch_bounds__(kDownThreads) down_kernel(const MoeDecodeParams p, int rows_per_cta, int lpr,
                                                             int gshift, int slots_per_pass, int had_m,
                                                             int had_log2p) {
  const int t = blockIdx.x;
  const int H = static_cast<int>(p.hidden_dim), I = static_cast<int>(p.inter_dim), k = static_cast<int>(p.top_k);
  const int nch = I / 32, groups = static_cast<int>(I / p.group2);
  const int n_begin = blockIdx.y * rows_per_cta;
  const int nrows = min(rows_per_cta, H - n_begin);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gpw = 32 / lpr, group = lane / lpr, lig = lane % lpr;
  const int gidx = warp * gpw + group;                     // lane group index in the CTA
  const int items_per_round = (kDownThreads / 32) * gpw * 2;  // 2 items per lane group
  const bool sbf16 = p.w2_scale_dtype == FloatDType::kBFloat16;
  const bool abf16 = p.act_dtype == FloatDType::kBFloat16;

  extern __shared__ float4 smem[];
  float4* xs = smem;                                                       // [spp][nch * 8] float4
  float* xsum = reinterpret_cast<float*>(smem + slots_per_pass * nch * 8);  // [spp][nch]
  float* part = xsum + slots_per_pass * nch;                                // [spp][rows_per_cta]

  // Items of a pass: it = jj * nrows + rr (slot jj of the pass, row rr of the block).
  auto make_rows = [&](int j0, int items, int it0) {
    RowSet<2> rs;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int it = it0 + r;
      const bool in_range = it < items;
      const int jj = in_range ? it / nrows : 0;  // keeps the shared-memory pointers in bounds
      const int rr = in_range ? it - jj * nrows : 0;
      const int64_t e = in_range ? decode::load_id(p.topk_ids, p.ids_dtype, static_cast<int64_t>(t) * k + j0 + jj) : -1;
      const bool valid = e >= 0 && e < p.num_experts;
      const int64_t row = e * H + n_begin + rr;
      rs.w[r] = valid ? reinterpret_cast<const uint4*>(p.w2_qweight + row * (I / 8)) : nullptr;
      rs.s[r] = static_cast<const uint16_t*>(p.w2_scales) + row * groups;
      rs.z[r] = kZ ? p.w2_qzeros + row * groups : nullptr;
      rs.x[r] = xs + jj * nch * 8;
      rs.xsum[r] = xsum + jj * nch;
    }
    return rs;
  };

  float out_acc = 0.0f;  // thread rr < nrows owns row n_begin + rr
  for (int j0 = 0; j0 < k; j0 += slots_per_pass) {
    const int js = min(slots_per_pass, k - j0);
    const int items = js * nrows;
    // Ask L2 for the pass's weight rows now (up to kPrefetchBytes), so HBM streams them during the
    // prologue (the Hadamard). Not into registers: the transform needs them (no spills at 512 threads).
    const int prefetch_items = min(items, static_cast<int>(kPrefetchBytes / (I / 2)));
    for (int it = threadIdx.x; it < prefetch_items; it += blockDim.x) {
      const int jj = it / nrows;
      const int64_t e = decode::load_id(p.topk_ids, p.ids_dtype, static_cast<int64_t>(t) * k + j0 + jj);
      if (e >= 0 && e < p.num_experts) {
        decode::prefetch_l2(p.w2_qweight + (e * H + n_begin + it - jj * nrows) * (I / 8), I / 2);
      }
    }

    // Prologue: h rows of the pass's slots -> shared memory (zeros for sentinel slots).
    for (int idx = threadIdx.x; idx < js * nch; idx += blockDim.x) {
      const int jj = idx / nch, c = idx - jj * nch;
      const int64_t slot = static_cast<int64_t>(t) * k + j0 + jj;
      const int64_t e = decode::load_id(p.topk_ids, p.ids_dtype, slot);
      const bool valid = e >= 0 && e < p.num_experts;
      const float4* src = reinterpret_cast<const float4*>(p.h + slot * I) + c * 8;
      float4* dst = xs + (jj * nch + c) * 8;
      // Natural layout for the Hadamard (its address arithmetic stays cheap); swizzled right away otherwise.
      const int sw = p.online_hadamard ? 0 : (c & 7);
      float sum = 0.0f;
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const float4 v = valid ? __ldcg(src + q) : make_float4(0.f, 0.f, 0.f, 0.f);
        dst[q ^ sw] = v;
        sum += (v.x + v.y) + (v.z + v.w);
      }
      xsum[jj * nch + c] = sum;  // overwritten below when the Hadamard changes the row
    }
    __syncthreads();
    if (p.online_hadamard) {
      hadamard::hadamard_rows(reinterpret_cast<float*>(xs), js, I, had_m, had_log2p, p.hadamard_scale,
                              hadamard::NaturalLayout{});
      // Round the rotated activation to the activation dtype (as the reference does), redo the chunk sums,
      // and swizzle each chunk in place (one thread owns a chunk: it reads all of it before writing).
      for (int idx = threadIdx.x; idx < js * nch; idx += blockDim.x) {
        float4* chunk = xs + idx * 8;
        const int c = idx % nch;
        float4 v[8];
        float sum = 0.0f;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          v[q] = chunk[q];
          v[q].x = decode::round_to(v[q].x, abf16);
          v[q].y = decode::round_to(v[q].y, abf16);
          v[q].z = decode::round_to(v[q].z, abf16);
          v[q].w = decode::round_to(v[q].w, abf16);
          sum += (v[q].x + v[q].y) + (v[q].z + v[q].w);
        }
#pragma unroll
        for (int q = 0; q < 8; ++q) chunk[q ^ (c & 7)] = v[q];
        xsum[idx] = sum;
      }
      __syncthreads();
    }

    for (int base = 0; base < items; base += items_per_round) {  // block-uniform bounds
      const int it0 = base + gidx * 2;
      const RowSet<2> rs = make_rows(j0, items, it0);
      Batch<2, kZ> cur;
      decode::load_batch<2, kZ>(rs, lig, lpr, nch, gshift, cur);
      float acc[2] = {0.0f, 0.0f};
      decode::dot_loop<2, kZ, false>(rs, cur, lig, lpr, nch, gshift, sbf16, acc);
      decode::reduce_group(acc, lpr);
      if (lig == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int it = it0 + r;
          if (it < items) {
            const int jj = it / nrows, rr = it - jj * nrows;
            const int64_t slot = static_cast<int64_t>(t) * k + j0 + jj;
            // Sentinel slots contribute 0 (their acc stayed 0 and their weight may be anything).
            const float w = rs.w[r] ? decode::load_weight(p.topk_weights, p.weights_dtype, slot) : 0.0f;
            part[jj * rows_per_cta + rr] = rs.w[r] ? decode::round_to(acc[r], abf16) * w : 0.0f;
          }
        }
      }
    }
    __syncthreads();
    if (threadIdx.x < nrows) {
      for (int jj = 0; jj < js; ++jj) out_acc += part[jj * rows_per_cta + threadIdx.x];
    }
    __syncthreads();  // before the next pass overwrites xs / part
  }
  if (threadIdx.x < nrows) {
    static_cast<uint16_t*>(p.out)[static_cast<int64_t>(t) * H + n_begin + threadIdx.x] =
        decode::float_to_bits(out_acc, abf16);
  }
}

// ---------------------------------------------------------------- host side

struct DeviceInfo {
  int sms = 0, smem_optin = 0;
};

cudaError_t device_info(int device, DeviceInfo& info) {
  cudaError_t err = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return err;
}

// Lanes per row: the largest of 32 / 16 / 8 that keeps >= 90% of the lanes busy on nch chunks (e.g.
// I = 768 -> 24 chunks -> 8 lanes x 3; I = 1408 -> 44 -> 16 lanes; H = 4096 -> 128 -> 32 lanes x 4).
int lanes_per_row(int nch) {
  int best = 32;
  double best_eff = 0.0;
  for (int lpr = 32; lpr >= 8; lpr /= 2) {
    const double eff = static_cast<double>(nch) / (lpr * ((nch + lpr - 1) / lpr));
    if (eff >= 0.9) return lpr;
    if (eff > best_eff) {
      best_eff = eff;
      best = lpr;
    }
  }
  return best;
}

// log2(group / 32) so that chunk c lies in group c >> shift; 31 for per-channel (one group); -1 if the
// group size is neither.
int group_shift(int64_t group, int64_t k) {
  if (group == k) return 31;
  if (group < 32 || group % 32 != 0 || k % group != 0) return -1;
  const int64_t chunks = group / 32;
  if (chunks & (chunks - 1)) return -1;
  int s = 0;
  while ((int64_t{1} << s) < chunks) ++s;
  return s;
}

int64_t gate_up_smem(int64_t H) { return H * 4 + (H / 32) * 4; }
int64_t down_smem_per_slot(int64_t I) { return I * 4 + (I / 32) * 4 + kDownRowsMax * 4; }

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <bool kZ13, bool kZ2>
cudaError_t launch_typed(const MoeDecodeParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  const int H = static_cast<int>(p.hidden_dim), I = static_cast<int>(p.inter_dim);
  const int T = static_cast<int>(p.num_tokens), k = static_cast<int>(p.top_k);

  // Kernel 1.
  const int lpr1 = lanes_per_row(H / 32);
  const int rows1 = (kGateUpThreads / 32) * (32 / lpr1) * kGateUpRounds;
  const int64_t smem1 = gate_up_smem(H);
  cudaError_t err = allow_smem(gate_up_kernel<kZ13>, smem1);
  if (err != cudaSuccess) return err;
  const dim3 grid1(static_cast<unsigned>(T * k), static_cast<unsigned>((I + rows1 - 1) / rows1));
  gate_up_kernel<kZ13><<<grid1, kGateUpThreads, smem1, stream>>>(p, rows1, lpr1, group_shift(p.group13, H));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // Kernel 2: as many h slots per pass as the budget allows, then rows per CTA so that one wave of
  // resident CTAs (registers, 512 threads and shared memory permitting: 1 per SM on H100) covers T * H.
  const int64_t per_slot = down_smem_per_slot(I);
  const int64_t budget = std::min<int64_t>(std::max<int64_t>(kDownSmemBudget, per_slot), dev.smem_optin);
  const int spp = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(k, budget / per_slot)));
  const int64_t smem2 = spp * per_slot;
  err = allow_smem(down_kernel<kZ2>, smem2);
  if (err != cudaSuccess) return err;
  int ctas_per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, down_kernel<kZ2>, kDownThreads, smem2);
  if (err != cudaSuccess) return err;
  const int64_t wave = static_cast<int64_t>(dev.sms) * std::max(1, ctas_per_sm);
  const int64_t blocks_per_token = std::max<int64_t>(1, (wave + T - 1) / T);
  int rows2 = static_cast<int>((H + blocks_per_token - 1) / blocks_per_token);
  rows2 = std::min(kDownRowsMax, std::max(8, (rows2 + 7) / 8 * 8));
  int had_m = 1, had_log2p = 0;
  if (p.online_hadamard && !hadamard::factor(I, had_m, had_log2p)) return cudaErrorInvalidValue;
  const dim3 grid2(static_cast<unsigned>(T), static_cast<unsigned>((H + rows2 - 1) / rows2));
  down_kernel<kZ2><<<grid2, kDownThreads, smem2, stream>>>(p, rows2, lanes_per_row(I / 32), group_shift(p.group2, I),
                                                           spp, had_m, had_log2p);
  return cudaGetLastError();
}

}  // namespace

const char* moe_decode_unsupported(const MoeDecodeParams& p, int device) {
  if (p.hidden_dim <= 0 || p.hidden_dim % 32 != 0) return "hidden size H must be a positive multiple of 32";
  if (p.inter_dim <= 0 || p.inter_dim % 32 != 0) return "intermediate size I must be a positive multiple of 32";
  if (p.hidden_dim >= (int64_t{1} << 24) || p.inter_dim >= (int64_t{1} << 24)) return "H and I must be below 2^24";
  if (group_shift(p.group13, p.hidden_dim) < 0) {
    return "gate_up group size must be 32 * 2^j dividing H (32, 64, 128, ...) or per-channel";
  }
  if (group_shift(p.group2, p.inter_dim) < 0) {
    return "down group size must be 32 * 2^j dividing I (32, 64, 128, ...) or per-channel";
  }
  int m = 0, log2p = 0;
  if (p.online_hadamard && !hadamard::factor(p.inter_dim, m, log2p)) {
    return "online Hadamard needs I = m * 2^k with m in {1, 12, 20, 28, 40, 44}";
  }
  if (p.num_tokens * p.top_k >= (int64_t{1} << 31)) return "T * k must be below 2^31 (one CTA row per slot)";
  if (device < 0) return nullptr;
  DeviceInfo dev;
  if (device_info(device, dev) != cudaSuccess) return "could not query the device's shared memory";
  if (gate_up_smem(p.hidden_dim) > dev.smem_optin) return "H too large: the gate_up kernel keeps x (4 bytes per feature) in shared memory";
  if (down_smem_per_slot(p.inter_dim) > dev.smem_optin) {
    return "I too large: the down kernel keeps one h row (4 bytes per feature) in shared memory";
  }
  return nullptr;
}

cudaError_t moe_decode_launch(const MoeDecodeParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.top_k == 0) return cudaSuccess;  // the shim returns zeros / an empty tensor
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (moe_decode_unsupported(p, device) != nullptr) return cudaErrorInvalidValue;
  DeviceInfo dev;
  err = device_info(device, dev);
  if (err != cudaSuccess) return err;
  const bool z13 = p.w13_qzeros != nullptr, z2 = p.w2_qzeros != nullptr;
  if (z13 && z2) return launch_typed<true, true>(p, dev, stream);
  if (z13) return launch_typed<true, false>(p, dev, stream);
  if (z2) return launch_typed<false, true>(p, dev, stream);
  return launch_typed<false, false>(p, dev, stream);
}

}  // namespace moeq
