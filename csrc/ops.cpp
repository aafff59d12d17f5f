// Torch shim of the moeq CUDA extension (moeq_kernels._C): input checks, the moeq_C op registrations,
// and the Python module init.
//
// Ops live in the `moeq_C` namespace, not `moeq`: the Python side already owns `moeq` (custom_op
// moeq::dequantize / moeq::fused_experts, moeq_kernels/ops.py), and a namespace may have only one
// TORCH_LIBRARY block. moeq_kernels/_cuda.py registers moeq_C::dequantize as the `cuda` backend of
// moeq::dequantize and holds its fake (shape-only) implementation.
//
// Every check runs before anything touches the GPU, and the device check comes last, so a CPU call
// (routed to the CPU registration below) reports a wrong shape or dtype exactly as a CUDA call would.

// Python.h first: it may set feature macros that change system headers.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "dequant.h"

namespace moeq {
namespace {

// Sizes of a validated call, resolved from the tensors.
struct DequantShape {
  int64_t num_experts, rows, cols, group_size;
  ScaleDType scale_dtype;
};

DequantShape check_dequant_inputs(const at::Tensor& qweight, const at::Tensor& scales,
                                  const std::optional<at::Tensor>& qzeros, int64_t bits, int64_t group_size) {
  constexpr const char* kOp = "moeq_C::dequantize: ";
  TORCH_CHECK(dequant_bits_supported(bits), kOp, "bits=", bits,
              " is not supported by the CUDA kernel (expected 2, 4 or 8); 3-bit values straddle int32 words, "
              "use the reference or triton backend");
  TORCH_CHECK(qweight.scalar_type() == at::kInt, kOp, "qweight must be int32, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 3, kOp, "qweight must be 3-D [E, N, K * bits / 32], got shape ", qweight.sizes());
  TORCH_CHECK(qweight.size(2) <= 1 || qweight.stride(2) == 1, kOp,
              "qweight must be contiguous along its last dim (stride 1), got strides ", qweight.strides());

  const int64_t num_experts = qweight.size(0), rows = qweight.size(1);
  const int64_t cols = qweight.size(2) * 32 / bits;  // K: whole words, so K * bits % 32 == 0 by construction
  TORCH_CHECK(group_size == -1 || (group_size > 0 && cols % group_size == 0), kOp, "group_size=", group_size,
              " must be -1 (per-channel) or a positive divisor of K=", cols);
  const int64_t resolved_group = group_size == -1 ? cols : group_size;
  TORCH_CHECK(resolved_group > 0, kOp, "per-channel group_size=-1 needs K > 0, got K=0");
  const int64_t groups = cols / resolved_group;

  const auto sdtype = scales.scalar_type();
  TORCH_CHECK(sdtype == at::kHalf || sdtype == at::kBFloat16, kOp, "scales must be float16 or bfloat16, got ",
              sdtype);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == num_experts && scales.size(1) == rows &&
                  scales.size(2) == groups,
              kOp, "scales must have shape [", num_experts, ", ", rows, ", ", groups, "] (E, N, K / group_size with K=",
              cols, ", group_size=", group_size, "), got ", scales.sizes());
  if (qzeros.has_value()) {
    const at::Tensor& z = *qzeros;
    TORCH_CHECK(z.scalar_type() == at::kByte, kOp, "qzeros must be uint8, got ", z.scalar_type());
    TORCH_CHECK(z.dim() == 3 && z.size(0) == num_experts && z.size(1) == rows && z.size(2) == groups, kOp,
                "qzeros must have shape [", num_experts, ", ", rows, ", ", groups, "] like scales, got ", z.sizes());
  }

  TORCH_CHECK(qweight.is_cuda(), kOp, "runs on CUDA tensors only; qweight is on ", qweight.device(),
              " (the reference backend, moeq_kernels.packing.dequantize, runs anywhere)");
  TORCH_CHECK(scales.device() == qweight.device(), kOp, "scales must be on ", qweight.device(), " like qweight, got ",
              scales.device());
  if (qzeros.has_value()) {
    TORCH_CHECK(qzeros->device() == qweight.device(), kOp, "qzeros must be on ", qweight.device(),
                " like qweight, got ", qzeros->device());
  }
  return {num_experts, rows, cols, resolved_group,
          sdtype == at::kHalf ? ScaleDType::kFloat16 : ScaleDType::kBFloat16};
}

at::Tensor dequantize_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& qzeros, int64_t bits, int64_t group_size) {
  const DequantShape shape = check_dequant_inputs(qweight, scales, qzeros, bits, group_size);
  const c10::cuda::CUDAGuard device_guard(qweight.device());
  at::Tensor out = at::empty({shape.num_experts, shape.rows, shape.cols}, scales.options());

  DequantParams p;
  p.qweight = qweight.data_ptr<int32_t>();
  p.scales = scales.data_ptr();
  p.qzeros = qzeros.has_value() ? qzeros->data_ptr<uint8_t>() : nullptr;
  p.out = out.data_ptr();
  p.num_experts = shape.num_experts;
  p.rows = shape.rows;
  p.cols = shape.cols;
  p.qweight_stride_e = qweight.stride(0);
  p.qweight_stride_n = qweight.stride(1);
  p.scales_stride_e = scales.stride(0);
  p.scales_stride_n = scales.stride(1);
  p.scales_stride_g = scales.stride(2);
  if (qzeros.has_value()) {
    p.qzeros_stride_e = qzeros->stride(0);
    p.qzeros_stride_n = qzeros->stride(1);
    p.qzeros_stride_g = qzeros->stride(2);
  }
  p.bits = static_cast<int32_t>(bits);
  p.group_size = shape.group_size;
  p.scale_dtype = shape.scale_dtype;

  const cudaError_t err = dequant_launch(p, c10::cuda::getCurrentCUDAStream(qweight.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "moeq_C::dequantize: kernel launch failed on ", qweight.device(), ": ",
              cudaGetErrorString(err),
              err == cudaErrorNoKernelImageForDevice
                  ? " (the extension was not built for this GPU: rebuild with TORCH_CUDA_ARCH_LIST including it)"
                  : "");
  return out;
}

// CPU registration: the op has no CPU kernel, but without this the dispatcher answers a CPU call with a
// generic "could not run with arguments from the 'CPU' backend". Running the same checks gives the caller
// the precise problem (a bad shape, or simply "runs on CUDA tensors only"), and makes the checks testable
// on machines without a GPU. check_dequant_inputs always throws here: its device check is last.
at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                          const std::optional<at::Tensor>& qzeros, int64_t bits, int64_t group_size) {
  check_dequant_inputs(qweight, scales, qzeros, bits, group_size);
  TORCH_CHECK(false, "moeq_C::dequantize: runs on CUDA tensors only");
}

}  // namespace
}  // namespace moeq

TORCH_LIBRARY(moeq_C, m) {
  // Where the fake (shape-only) implementation lives, so FakeTensorMode / torch.compile can import it.
  m.set_python_module("moeq_kernels._cuda");
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor? qzeros, int bits, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeq_C, CUDA, m) { m.impl("dequantize", &moeq::dequantize_cuda); }

TORCH_LIBRARY_IMPL(moeq_C, CPU, m) { m.impl("dequantize", &moeq::dequantize_cpu); }

// Python module init: `import moeq_kernels._C` loads this library, which runs the static registrations
// above. The module itself exposes nothing (ops are reached through torch.ops.moeq_C), so plain CPython
// API replaces pybind11 and its compile time. TORCH_EXTENSION_NAME (_C) is defined by torch's build.
#define MOEQ_CONCAT_(a, b) a##b
#define MOEQ_CONCAT(a, b) MOEQ_CONCAT_(a, b)
#define MOEQ_STR_(x) #x
#define MOEQ_STR(x) MOEQ_STR_(x)

PyMODINIT_FUNC MOEQ_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      MOEQ_STR(TORCH_EXTENSION_NAME),  // m_name
      "moeq CUDA kernels; ops are registered under torch.ops.moeq_C",  // m_doc
      -1,       // m_size: no per-module state
      nullptr,  // m_methods
  };
  return PyModule_Create(&module);
}
