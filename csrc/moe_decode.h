// Parameters of the decode-path fused MoE kernels (csrc/moe_decode.cu) and of the standalone Hadamard
// transform (csrc/hadamard.cu), free of torch types (same reasoning as dequant.h: the .cu files include no
// torch header, so they compile in seconds and the shim in csrc/ops.cpp is the only torch-aware code).
//
// Semantics (the reference is moeq_kernels.reference.experts.fused_experts_ref):
//   for every token t and slot j < k with expert e = ids[t, j] in [0, E) (others are sentinels, skipped):
//     gate, up = x[t] @ W13[e][0:I]^T, x[t] @ W13[e][I:2I]^T        (each rounded to the activation dtype)
//     h = silu(gate) * up                                             (rounded)
//     h = h @ H_I / sqrt(I)           if online_hadamard              (rounded; moeq_kernels/hadamard.py)
//     y = h @ W2[e]^T                                                 (rounded)
//     out[t] += w[t, j] * y                                           (fp32, slots in order j = 0..k-1)
//   out is written in the activation dtype; a token whose slots are all sentinels gets zeros.
//
// Tensors (every one contiguous, base pointers 16-byte aligned; the shim guarantees both):
//   hidden        [T, H]            fp16 / bf16 (the activation dtype, act_dtype)
//   topk_ids      [T, k]            int32 / int64
//   topk_weights  [T, k]            fp32 / fp16 / bf16
//   w13_qweight   int32 [E, 2I, H/8]  (format: moeq_kernels/packing.py; rows [0, I) gate, [I, 2I) up)
//   w13_scales    [E, 2I, H/g13]    fp16 / bf16;  w13_qzeros uint8 [E, 2I, H/g13] or null (zero 8)
//   w2_qweight    int32 [E, H, I/8];  w2_scales [E, H, I/g2];  w2_qzeros uint8 [E, H, I/g2] or null
//   h             fp32 [T*k, I]     workspace written by the gate_up kernel, read by the down kernel
//   out           [T, H]            act_dtype
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace moeq {

// Element types of the 16/32-bit float tensors. Runtime enums, not template parameters: the kernels
// touch activations, scales and routing weights a few times per 32 weights, so a warp-uniform switch
// costs nothing measurable and keeps the instantiation count (and build time) low.
enum class FloatDType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class IndexDType : int32_t { kInt32 = 0, kInt64 = 1 };

struct MoeDecodeParams {
  const void* hidden = nullptr;        // [T, H] act_dtype
  const void* topk_ids = nullptr;      // [T, k] ids_dtype
  const void* topk_weights = nullptr;  // [T, k] weights_dtype
  const int32_t* w13_qweight = nullptr;
  const void* w13_scales = nullptr;
  const uint8_t* w13_qzeros = nullptr;  // nullptr: symmetric
  const int32_t* w2_qweight = nullptr;
  const void* w2_scales = nullptr;
  const uint8_t* w2_qzeros = nullptr;  // nullptr: symmetric
  float* h = nullptr;                  // [T*k, I] fp32 workspace
  void* out = nullptr;                 // [T, H] act_dtype

  int64_t num_tokens = 0;   // T
  int64_t top_k = 0;        // k
  int64_t num_experts = 0;  // E
  int64_t hidden_dim = 0;   // H
  int64_t inter_dim = 0;    // I
  int64_t group13 = 0;      // resolved group size of w13 along H (H for per-channel)
  int64_t group2 = 0;       // resolved group size of w2 along I (I for per-channel)

  FloatDType act_dtype = FloatDType::kBFloat16;      // fp16 / bf16
  FloatDType w13_scale_dtype = FloatDType::kBFloat16;  // fp16 / bf16
  FloatDType w2_scale_dtype = FloatDType::kBFloat16;   // fp16 / bf16
  FloatDType weights_dtype = FloatDType::kFloat32;     // fp32 / fp16 / bf16
  IndexDType ids_dtype = IndexDType::kInt64;

  bool online_hadamard = false;
  float hadamard_scale = 1.0f;  // 1/sqrt(I)
};

// Why a call cannot run on `device` (sizes, group sizes, shared memory of that GPU), or nullptr when it
// can; device < 0 checks only what does not depend on the GPU. The shim's TORCH_CHECKs catch malformed
// tensors first; this owns the kernel's own limits, so the shim, the launcher and moeq_kernels/_cuda.py
// (which mirrors it for dispatch) agree.
const char* moe_decode_unsupported(const MoeDecodeParams& params, int device);

// Enqueues the two kernels on `stream` (gate_up + SiLU*up, then [Hadamard] + down + weighted sum).
// No host synchronization and no allocation: capturable in a CUDA graph. Returns cudaSuccess,
// cudaErrorInvalidValue when moe_decode_unsupported() objects, or the launch error.
cudaError_t moe_decode_launch(const MoeDecodeParams& params, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Standalone Hadamard transform (csrc/hadamard.cu): y[r] = (x[r] @ H_n) * scale over rows of length
// n = m * 2^k, m in {1, 12, 20, 28, 44} (40 * 2^k is run as 20 * 2^(k+1)); H_n as in
// moeq_kernels/hadamard.py (H_m (x) H_{2^k}, base-m index major, symmetric).
//   x, y  [rows, n] contiguous, dtype fp32 / fp16 / bf16 (same for both); fp32 arithmetic, one rounding.
struct HadamardParams {
  const void* x = nullptr;
  void* y = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  float scale = 1.0f;
  FloatDType dtype = FloatDType::kFloat32;
};

// Why `n` (or the device's shared memory; skipped for device < 0) rules the transform out, or nullptr.
const char* hadamard_unsupported(int64_t n, int device);

cudaError_t hadamard_launch(const HadamardParams& params, cudaStream_t stream);

}  // namespace moeq
