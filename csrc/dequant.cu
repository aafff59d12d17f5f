// Dequantize a packed weight stack to dense fp16 / bf16: the CUDA backend of moeq::dequantize.
//
// Reference (the format's definition, which this kernel must match bit for bit):
//   moeq_kernels.packing.dequantize  (Python, moeq_kernels/packing.py)
// tests/kernels/test_cuda_ext.py compares the two with torch.equal on random stacks.
//
// Work split: one thread per int32 word of qweight. A word holds 32 / bits consecutive values of one
// row, so a warp reads 128 contiguous bytes and writes 32 * (32 / bits) * 2 contiguous bytes (512 for
// 4-bit) as 8- to 16-byte vector stores. This op materializes a full dense weight, so it is bound by the
// output writes; the fused expert kernels never call it on their hot path.
//
// No torch header here (see dequant.h): this translation unit compiles in seconds per architecture.

#include "dequant.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace moeq {
namespace {

constexpr int kThreads = 256;
// Grid-stride loop: cap the grid so huge stacks do not need more blocks than the hardware schedules at
// once anyway; 2^16 blocks of 256 threads already oversubscribe any current GPU many times.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// Element-type helpers: conversions that round exactly like torch's `.to(dtype)` (round to nearest even)
// and expose the raw 16 bits so the kernel can assemble vector stores without type punning.
template <typename T>
struct ScaleOps;

template <>
struct ScaleOps<__half> {
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static uint32_t round_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct ScaleOps<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static uint32_t round_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

// One value: (q - z) * s in fp32. The explicit _rn intrinsics keep the two roundings of the reference
// (the subtraction is exact for 8-bit codes; the product rounds once) and can never be contracted or
// flushed to zero: bf16 scales reach fp32's subnormal range, where -ftz would change results. This is
// also why the build does not use --use_fast_math.
__device__ __forceinline__ float dequant_value(uint32_t code, float zero, float scale) {
  return __fmul_rn(__fsub_rn(static_cast<float>(code), zero), scale);
}

// Stores kWords 32-bit words (2 * kWords output values) with the widest aligned vector stores.
// Alignment holds because the output is contiguous, K is a multiple of 32 / bits, and the first value a
// thread writes sits at an index that is a multiple of 32 / bits (so at 8, 16 or 32 bytes).
template <int kWords>
__device__ __forceinline__ void store_words(uint32_t* dst, const uint32_t (&w)[kWords]) {
  if constexpr (kWords == 2) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
  } else {
    static_assert(kWords % 4 == 0, "stores are 8 bytes or a multiple of 16 bytes");
#pragma unroll
    for (int i = 0; i < kWords; i += 4) {
      *reinterpret_cast<uint4*>(dst + i) = make_uint4(w[i], w[i + 1], w[i + 2], w[i + 3]);
    }
  }
}

template <int kBits, typename T>
__global__ void __launch_bounds__(kThreads) dequant_kernel(const DequantParams p) {
  constexpr int kPerWord = 32 / kBits;
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  constexpr float kSymZero = static_cast<float>(1 << (kBits - 1));

  const T* scales = static_cast<const T*>(p.scales);
  const int64_t words_per_row = p.cols / kPerWord;
  const int64_t total = p.num_experts * p.rows * words_per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t w = i % words_per_row;
    const int64_t row = i / words_per_row;  // e * N + n
    const int64_t n = row % p.rows;
    const int64_t e = row / p.rows;

    const uint32_t word = static_cast<uint32_t>(__ldg(p.qweight + e * p.qweight_stride_e + n * p.qweight_stride_n + w));
    const T* srow = scales + e * p.scales_stride_e + n * p.scales_stride_n;
    const uint8_t* zrow = p.qzeros ? p.qzeros + e * p.qzeros_stride_e + n * p.qzeros_stride_n : nullptr;

    // Group of the word's first value, and the first k of the next group. When group_size is a multiple
    // of 32 / bits (every real config) the boundary test below is never true; smaller groups, which the
    // format allows, reload scale and zero inside the word instead of needing a second kernel.
    const int64_t k0 = w * kPerWord;
    int64_t g = k0 / p.group_size;
    int64_t next_group_k = (g + 1) * p.group_size;
    float scale = ScaleOps<T>::to_float(srow[g * p.scales_stride_g]);
    float zero = zrow ? static_cast<float>(zrow[g * p.qzeros_stride_g]) : kSymZero;

    uint32_t out_words[kPerWord / 2];
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) {
      if (k0 + j == next_group_k) {
        ++g;
        next_group_k += p.group_size;
        scale = ScaleOps<T>::to_float(srow[g * p.scales_stride_g]);
        zero = zrow ? static_cast<float>(zrow[g * p.qzeros_stride_g]) : kSymZero;
      }
      const uint32_t code = (word >> (kBits * j)) & kMask;
      const uint32_t bits16 = ScaleOps<T>::round_bits(dequant_value(code, zero, scale));
      // Little-endian: the value at the lower index occupies the low half of the 32-bit word.
      if (j % 2 == 0) {
        out_words[j / 2] = bits16;
      } else {
        out_words[j / 2] |= bits16 << 16;
      }
    }
    uint32_t* dst = reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + row * p.cols + k0);
    store_words<kPerWord / 2>(dst, out_words);
  }
}

template <int kBits, typename T>
cudaError_t launch_typed(const DequantParams& p, cudaStream_t stream) {
  const int64_t total_words = p.num_experts * p.rows * (p.cols / (32 / kBits));
  int64_t blocks = (total_words + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  dequant_kernel<kBits, T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// 3 bit widths x 2 dtypes = 6 instantiations: has_zeros stays a runtime (warp-uniform) branch so the
// instantiation count, and with it compile time, does not double.
template <typename T>
cudaError_t launch_bits(const DequantParams& p, cudaStream_t stream) {
  switch (p.bits) {
    case 2:
      return launch_typed<2, T>(p, stream);
    case 4:
      return launch_typed<4, T>(p, stream);
    case 8:
      return launch_typed<8, T>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t dequant_launch(const DequantParams& p, cudaStream_t stream) {
  // An empty stack has nothing to write (and may carry null data pointers).
  if (p.num_experts * p.rows * p.cols == 0) return cudaSuccess;
  // The shim refuses all of these with a clear message; this only guards against a caller that skipped it.
  if (!dequant_bits_supported(p.bits) || p.group_size <= 0 || p.cols % (32 / p.bits) != 0 ||
      p.cols % p.group_size != 0 || p.qweight == nullptr || p.scales == nullptr || p.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (p.scale_dtype) {
    case ScaleDType::kFloat16:
      return launch_bits<__half>(p, stream);
    case ScaleDType::kBFloat16:
      return launch_bits<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moeq
