// Standalone Hadamard transform over the last dim: the CUDA backend of moeq::hadamard_transform.
//
// Reference: moeq_kernels.reference.hadamard.hadamard_ref (y = (x @ H_n) * scale, H_n = H_m (x) H_{2^k}
// from moeq_kernels/hadamard.py); tests/kernels/test_cuda_moe.py compares the two.
//
// One CTA per `rows_per_cta` rows: the rows are read once into shared memory as fp32 (natural layout),
// transformed there by moeq::hadamard::hadamard_rows (the same device code as the fused down-projection
// prologue in moe_decode.cu), and written once, rounded to the I/O dtype. Memory-bound for large row
// counts (one read + one write); at decode sizes it is one short launch.
//
// Limits (hadamard_unsupported): n = m * 2^k with m in {1, 12, 20, 28, 40, 44}; 4 * n bytes of shared
// memory per row within the device's opt-in limit (n <= 57344 on H100).

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hadamard_device.cuh"
#include "moe_decode.h"

namespace moeq {
namespace {

constexpr int kThreads = 256;        // unmeasured: to tune on H100
constexpr int64_t kRowFloats = 4096;  // rows per CTA = max(1, kRowFloats / n): short rows share a CTA

__device__ __forceinline__ float load_elem(const void* x, FloatDType dtype, int64_t i) {
  switch (dtype) {
    case FloatDType::kFloat16: return __half2float(static_cast<const __half*>(x)[i]);
    case FloatDType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

__device__ __forceinline__ void store_elem(void* y, FloatDType dtype, int64_t i, float v) {
  switch (dtype) {
    case FloatDType::kFloat16: static_cast<__half*>(y)[i] = __float2half_rn(v); break;
    case FloatDType::kBFloat16: static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(y)[i] = v; break;
  }
}

__global__ void __launch_bounds__(kThreads) hadamard_kernel(const HadamardParams p, int rows_per_cta, int m,
                                                            int log2p) {
  extern __shared__ float buf[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_cta;
  const int64_t left = p.rows - row0;
  const int rows = left < rows_per_cta ? static_cast<int>(left) : rows_per_cta;
  const int n = static_cast<int>(p.n);
  const int64_t base = row0 * n;
  // Consecutive threads touch consecutive elements: coalesced 2- or 4-byte accesses (the data is tiny at
  // decode; for large row counts the kernel is bound by these loads and stores).
  for (int i = threadIdx.x; i < rows * n; i += blockDim.x) buf[i] = load_elem(p.x, p.dtype, base + i);
  __syncthreads();
  hadamard::hadamard_rows(buf, rows, n, m, log2p, p.scale, hadamard::NaturalLayout{});
  for (int i = threadIdx.x; i < rows * n; i += blockDim.x) store_elem(p.y, p.dtype, base + i, buf[i]);
}

int rows_per_cta(int64_t n) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(16, kRowFloats / n))); }

}  // namespace

const char* hadamard_unsupported(int64_t n, int device) {
  int m = 0, log2p = 0;
  if (!hadamard::factor(n, m, log2p)) return "n is not m * 2^k with m in {1, 12, 20, 28, 40, 44}";
  if (n >= (int64_t{1} << 24)) return "n must be below 2^24";
  if (device < 0) return nullptr;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return "could not query the device's shared memory";
  }
  if (n * 4 > optin) return "n too large: the kernel keeps a row in shared memory (4 bytes per element)";
  return nullptr;
}

cudaError_t hadamard_launch(const HadamardParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (hadamard_unsupported(p.n, device) != nullptr || p.x == nullptr || p.y == nullptr) return cudaErrorInvalidValue;
  int m = 0, log2p = 0;
  hadamard::factor(p.n, m, log2p);
  const int rpc = rows_per_cta(p.n);
  const int64_t smem = static_cast<int64_t>(rpc) * p.n * 4;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(hadamard_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = (p.rows + rpc - 1) / rpc;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  hadamard_kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, rpc, m, log2p);
  return cudaGetLastError();
}

}  // namespace moeq
