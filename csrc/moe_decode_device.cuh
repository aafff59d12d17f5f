// Inner-loop building blocks of the decode MoE kernels (csrc/moe_decode.cu): element conversions, the
// activation staging into shared memory, and the packed-INT4 row . activation dot product of a lane group.
//
// Dot product layout. A row of K 4-bit values is K/32 chunks of 16 bytes (one uint4 = 4 int32 words =
// 32 consecutive values; packing.py puts value k in word k/8 at shift 4*(k%8)). A group of `lpr` lanes
// (8, 16 or 32, aligned within the warp) owns up to kR rows at once; lane `lig` takes chunks
// lig, lig + lpr, ... so a warp's 16-byte loads of one row are contiguous. Each batch loads kUnroll chunks
// of each of the kR rows (plus their scale and zero), and dot_loop issues batch i+1 before multiplying
// batch i, so 2 * kUnroll * kR loads per lane stay in flight. The group's partial sums meet in
// reduce_group (xor shuffles, offsets < lpr).
//
// Activations sit in shared memory as fp32, chunk-swizzled: float4 q (values 4q..4q+3) of chunk c at
// float4 slot c * 8 + (q ^ (c & 7)), so the 8 lanes of a quarter-warp, reading float4 q of 8 consecutive
// chunks, hit 8 different bank groups (unswizzled they would all hit one: a 128-byte stride). Next to
// them X_c, the sum of chunk c's 32 values, used by the dequantization identity explained at the top of
// moe_decode.cu.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moe_decode.h"

namespace moeq {
namespace decode {

constexpr int kUnroll = 2;  // chunks per row per batch; unmeasured: to tune on H100

// ---------------------------------------------------------------- conversions

__device__ __forceinline__ float bits_to_float(uint16_t b, bool bf16) {
  return bf16 ? __uint_as_float(static_cast<uint32_t>(b) << 16) : __half2float(__ushort_as_half(b));
}

__device__ __forceinline__ uint16_t float_to_bits(float v, bool bf16) {
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : __half_as_ushort(__float2half_rn(v));
}

// v rounded to the activation dtype (round to nearest even, as torch's .to(dtype)), back in fp32.
__device__ __forceinline__ float round_to(float v, bool bf16) { return bits_to_float(float_to_bits(v, bf16), bf16); }

__device__ __forceinline__ int64_t load_id(const void* ids, IndexDType dtype, int64_t i) {
  return dtype == IndexDType::kInt32 ? static_cast<int64_t>(__ldg(static_cast<const int32_t*>(ids) + i))
                                     : static_cast<int64_t>(__ldg(static_cast<const long long*>(ids) + i));
}

__device__ __forceinline__ float load_weight(const void* w, FloatDType dtype, int64_t i) {
  if (dtype == FloatDType::kFloat32) return __ldg(static_cast<const float*>(w) + i);
  return bits_to_float(__ldg(static_cast<const unsigned short*>(w) + i), dtype == FloatDType::kBFloat16);
}

// 16-byte load that skips L1 (each CTA reads a weight once; L2 still serves other CTAs of the same expert).
// (The host branches below are never compiled by nvcc's device pass; they let the kernels run on a CPU
// emulation of the CUDA execution model, tests/kernels/cuda_emu/, on machines without a GPU.)
__device__ __forceinline__ uint4 ld_stream(const uint4* ptr) {
#ifdef __CUDA_ARCH__
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
#else
  return *ptr;
#endif
}

// Prefetch `bytes` (a multiple of 16) at 16-byte aligned `ptr` into L2, without registers or waiting.
__device__ __forceinline__ void prefetch_l2(const void* ptr, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // One bulk request for the whole range (PTX 8.0, sm_90).
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr), "r"(bytes) : "memory");
#elif defined(__CUDA_ARCH__)
  for (int off = 0; off < bytes; off += 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(ptr) + off));
  }
#else
  (void)ptr;
  (void)bytes;
#endif
}

// ---------------------------------------------------------------- activation staging

// x_row (nch * 32 fp16/bf16 values, 16-byte aligned) -> xs (fp32, chunk-swizzled) and xsum[c]. All
// threads of the block take part; the caller places the barrier.
__device__ __forceinline__ void stage_activation(const uint16_t* x_row, bool bf16, int nch, float4* xs, float* xsum) {
  for (int c = threadIdx.x; c < nch; c += blockDim.x) {
    const uint4* src = reinterpret_cast<const uint4*>(x_row) + c * 4;
    float sum = 0.0f;
#pragma unroll
    for (int q2 = 0; q2 < 4; ++q2) {
      const uint4 raw = __ldg(src + q2);
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
      float f[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        f[2 * i] = bits_to_float(static_cast<uint16_t>(w[i] & 0xFFFFu), bf16);
        f[2 * i + 1] = bits_to_float(static_cast<uint16_t>(w[i] >> 16), bf16);
      }
      xs[c * 8 + ((2 * q2) ^ (c & 7))] = make_float4(f[0], f[1], f[2], f[3]);
      xs[c * 8 + ((2 * q2 + 1) ^ (c & 7))] = make_float4(f[4], f[5], f[6], f[7]);
      sum += ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
    }
    xsum[c] = sum;
  }
}

// ---------------------------------------------------------------- dot product of a lane group

// The kR rows a lane group works on. w == nullptr marks an inactive row (past the block's end, or a
// sentinel slot): it is never loaded and its result is discarded by the caller.
template <int kR>
struct RowSet {
  const uint4* w[kR];      // packed row, K/32 chunks
  const uint16_t* s[kR];   // scale row [G] (fp16/bf16 bits)
  const uint8_t* z[kR];    // zero row [G] (kZ only)
  const float4* x[kR];     // activation row in shared memory (swizzled)
  const float* xsum[kR];   // its chunk sums
};

template <int kR, bool kZ>
struct Batch {
  uint4 w[kUnroll][kR];
  uint16_t s[kUnroll][kR];
  uint8_t z[kUnroll][kR];
};

template <int kR, bool kZ>
__device__ __forceinline__ void load_batch(const RowSet<kR>& rs, int c0, int lpr, int nch, int gshift,
                                           Batch<kR, kZ>& b) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int c = c0 + u * lpr;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const bool on = rs.w[r] != nullptr && c < nch;
      const int g = c >> gshift;  // gshift = 31 for per-channel: always group 0
      b.w[u][r] = on ? ld_stream(rs.w[r] + c) : make_uint4(0u, 0u, 0u, 0u);
      b.s[u][r] = on ? __ldg(rs.s[r] + g) : static_cast<uint16_t>(0);
      if (kZ) b.z[u][r] = on ? __ldg(rs.z[r] + g) : static_cast<uint8_t>(0);
    }
  }
}

// 1 + q/16 for nibble J of w: the nibble moved to mantissa bits 19..22 of 1.0f.
template <int J>
__device__ __forceinline__ float nibble_plus_one(uint32_t w) {
  constexpr int kShift = 19 - 4 * J;
  const uint32_t t = kShift >= 0 ? (w << (kShift >= 0 ? kShift : 0)) : (w >> (kShift < 0 ? -kShift : 0));
  return __uint_as_float((t & 0x00780000u) | 0x3F800000u);
}

// sum over the word's 8 values of (1 + q/16) * x, x = xa (values 0..3) and xb (values 4..7).
__device__ __forceinline__ float word_dot(uint32_t w, const float4& xa, const float4& xb) {
  float acc = nibble_plus_one<0>(w) * xa.x;
  acc = fmaf(nibble_plus_one<1>(w), xa.y, acc);
  acc = fmaf(nibble_plus_one<2>(w), xa.z, acc);
  acc = fmaf(nibble_plus_one<3>(w), xa.w, acc);
  acc = fmaf(nibble_plus_one<4>(w), xb.x, acc);
  acc = fmaf(nibble_plus_one<5>(w), xb.y, acc);
  acc = fmaf(nibble_plus_one<6>(w), xb.z, acc);
  acc = fmaf(nibble_plus_one<7>(w), xb.w, acc);
  return acc;
}

// acc[r] += sum over the batch's chunks of (q - z) * s * x. kSameX: all rows share x (gate and up rows
// of one slot), so each activation float4 is read from shared memory once.
template <int kR, bool kZ, bool kSameX>
__device__ __forceinline__ void compute_batch(const RowSet<kR>& rs, const Batch<kR, kZ>& b, int c0, int lpr, int nch,
                                              bool sbf16, float (&acc)[kR]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int c = c0 + u * lpr;
    if (c >= nch) break;
    const int sw = c & 7;
    float part[kR][4];
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        const float4* xr = (kSameX ? rs.x[0] : rs.x[r]) + c * 8;
        const float4 xa = xr[(2 * wi) ^ sw], xb = xr[(2 * wi + 1) ^ sw];
        const uint4& wv = b.w[u][r];
        const uint32_t word = wi == 0 ? wv.x : wi == 1 ? wv.y : wi == 2 ? wv.z : wv.w;
        part[r][wi] = word_dot(word, xa, xb);
      }
    }
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const float sum_fx = (part[r][0] + part[r][1]) + (part[r][2] + part[r][3]);
      const float xsum = (kSameX ? rs.xsum[0] : rs.xsum[r])[c];
      const float scale = bits_to_float(b.s[u][r], sbf16);
      const float zz = kZ ? 16.0f + static_cast<float>(b.z[u][r]) : 24.0f;  // 16 + zero point (8 if symmetric)
      acc[r] = fmaf(scale, fmaf(16.0f, sum_fx, -zz * xsum), acc[r]);
    }
  }
}

// Whole row(s) for this lane: `cur` holds the batch at chunk lig (loaded by the caller, possibly long
// before, to overlap a prologue); each step prefetches the next batch before computing the current one.
// Unrolled by two (ping-pong between `cur` and `nxt`) so exactly two batches are ever live.
template <int kR, bool kZ, bool kSameX>
__device__ __forceinline__ void dot_loop(const RowSet<kR>& rs, Batch<kR, kZ>& cur, int lig, int lpr, int nch, int gshift,
                                         bool sbf16, float (&acc)[kR]) {
  const int step = lpr * kUnroll;
  Batch<kR, kZ> nxt;
  for (int c0 = lig; c0 < nch; c0 += 2 * step) {
    if (c0 + step < nch) load_batch<kR, kZ>(rs, c0 + step, lpr, nch, gshift, nxt);
    compute_batch<kR, kZ, kSameX>(rs, cur, c0, lpr, nch, sbf16, acc);
    if (c0 + step >= nch) break;
    if (c0 + 2 * step < nch) load_batch<kR, kZ>(rs, c0 + 2 * step, lpr, nch, gshift, cur);
    compute_batch<kR, kZ, kSameX>(rs, nxt, c0 + step, lpr, nch, sbf16, acc);
  }
}

// Sum acc over the lpr lanes of each group. Every lane of the warp must call it.
template <int kR>
__device__ __forceinline__ void reduce_group(float (&acc)[kR], int lpr) {
  for (int off = lpr / 2; off > 0; off /= 2) {
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  }
}

}  // namespace decode
}  // namespace moeq
