// Parameters of the packed-weight dequantize kernel (csrc/dequant.cu), free of torch types.
//
// Why a plain struct: dequant.cu then includes no torch header, so nvcc compiles it in seconds per
// architecture (torch's headers dominate build time and CI builds this on every run), and the kernel can
// be unit-tested or reused from another host without ATen. The torch shim (csrc/ops.cpp) validates the
// tensors and fills this struct; the kernel trusts it.
//
// Format (the single definition is moeq_kernels/packing.py):
//   qweight int32 [E, N, K * bits / 32]: row (e, n) is a little-endian bit stream, value k in word
//           k / (32 / bits) at shift bits * (k % (32 / bits)); codes are unsigned in [0, 2^bits - 1].
//   scales  fp16 / bf16 [E, N, G], G = K / group_size.
//   qzeros  uint8 [E, N, G], or absent: symmetric, implicit zero 2^(bits - 1).
//   out     [E, N, K] in the scale dtype: (q - z) * s computed in fp32, rounded once (round to nearest even).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace moeq {

// Scale (and output) element type. An enum rather than a template parameter of the struct so the shim
// can fill it from a runtime dtype without instantiating anything.
enum class ScaleDType : int32_t {
  kFloat16 = 0,
  kBFloat16 = 1,
};

struct DequantParams {
  const int32_t* qweight = nullptr;  // [E, N, W], W = K * bits / 32; element stride 1 along W
  const void* scales = nullptr;      // [E, N, G] of scale_dtype, any strides
  const uint8_t* qzeros = nullptr;   // [E, N, G], any strides; nullptr = symmetric
  void* out = nullptr;               // [E, N, K] of scale_dtype, contiguous

  int64_t num_experts = 0;  // E
  int64_t rows = 0;         // N (output features)
  int64_t cols = 0;         // K (input features), a multiple of 32 / bits; G = K / group_size

  // Element strides. qweight's stride along W is 1 (the shim checks it): consecutive threads then read
  // consecutive words. Scales and zeros are 1/group_size of the data, so arbitrary strides cost nothing
  // measurable and let callers pass views (e.g. a scale tensor stored transposed).
  int64_t qweight_stride_e = 0, qweight_stride_n = 0;
  int64_t scales_stride_e = 0, scales_stride_n = 0, scales_stride_g = 0;
  int64_t qzeros_stride_e = 0, qzeros_stride_n = 0, qzeros_stride_g = 0;

  int32_t bits = 4;         // 2, 4 or 8 (see dequant_bits_supported)
  int64_t group_size = 0;   // resolved: positive, divides K (per-channel is group_size = K)
  ScaleDType scale_dtype = ScaleDType::kFloat16;
};

// Bit widths the kernel handles: those where 32 / bits values fill a word exactly. 3-bit values straddle
// words (packing.py's bit stream) and are refused; the reference and Triton backends handle them.
constexpr bool dequant_bits_supported(int64_t bits) { return bits == 2 || bits == 4 || bits == 8; }

// Enqueues the kernel on `stream`. Returns cudaSuccess (nothing to do for an empty tensor),
// cudaErrorInvalidValue for parameters the shim should have refused, or the launch error
// (e.g. cudaErrorNoKernelImageForDevice on a GPU the build has no code for).
cudaError_t dequant_launch(const DequantParams& params, cudaStream_t stream);

}  // namespace moeq
