// Torch shim of the moeq CUDA extension (moeq_kernels._C): input checks, the moeq_C op registrations,
// and the Python module init.
//
// Ops live in the `moeq_C` namespace, not `moeq`: the Python side already owns `moeq` (custom_op
// moeq::dequantize / moeq::fused_experts, moeq_kernels/ops.py), and a namespace may have only one
// TORCH_LIBRARY block. moeq_kernels/_cuda.py registers the moeq_C ops as the `cuda` backends of the moeq
// ops (dequantize; fused_experts at decode sizes; hadamard_transform) and holds their fake (shape-only)
// implementations.
//
// Every check runs before anything touches the GPU, and the device check comes last, so a CPU call
// (routed to the CPU registration below) reports a wrong shape or dtype exactly as a CUDA call would.

// Python.h first: it may set feature macros that change system headers.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

#include "dequant.h"
#include "moe_decode.h"

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

// ---------------------------------------------------------------- fused_experts_decode

// Sizes and dtypes of a validated fused_experts_decode call (everything but the data pointers).
MoeDecodeParams check_decode_inputs(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& weights,
                                    const at::Tensor& w13_q, const at::Tensor& w13_s,
                                    const std::optional<at::Tensor>& w13_z, const at::Tensor& w2_q,
                                    const at::Tensor& w2_s, const std::optional<at::Tensor>& w2_z,
                                    int64_t group13, int64_t group2, bool online_hadamard) {
  constexpr const char* kOp = "moeq_C::fused_experts_decode: ";
  TORCH_CHECK(hidden.dim() == 2, kOp, "hidden must be 2-D [T, H], got shape ", hidden.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kHalf || hidden.scalar_type() == at::kBFloat16, kOp,
              "hidden must be float16 or bfloat16, got ", hidden.scalar_type());
  const int64_t tokens = hidden.size(0), hdim = hidden.size(1);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == tokens, kOp, "top_k_index must be [T, k] with T=", tokens,
              ", got shape ", ids.sizes());
  TORCH_CHECK(!at::isFloatingType(ids.scalar_type()) && ids.scalar_type() != at::kBool, kOp,
              "top_k_index must be an integer tensor, got ", ids.scalar_type());
  TORCH_CHECK(weights.sizes() == ids.sizes(), kOp, "top_k_weights must have the shape of top_k_index ", ids.sizes(),
              ", got ", weights.sizes());
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), kOp, "top_k_weights must be floating point, got ",
              weights.scalar_type());

  for (const auto* q : {&w13_q, &w2_q}) {
    const char* name = q == &w13_q ? "w13_qweight" : "w2_qweight";
    TORCH_CHECK(q->scalar_type() == at::kInt, kOp, name, " must be int32, got ", q->scalar_type());
    TORCH_CHECK(q->dim() == 3, kOp, name, " must be 3-D [E, N, K / 8], got shape ", q->sizes());
    TORCH_CHECK(q->is_contiguous(), kOp, name, " must be contiguous");
  }
  const int64_t experts = w13_q.size(0), inter = w2_q.size(2) * 8;
  TORCH_CHECK(w13_q.size(2) * 8 == hdim, kOp, "w13_qweight holds K=", w13_q.size(2) * 8,
              " input features per row (4-bit), but hidden has H=", hdim);
  TORCH_CHECK(w2_q.size(0) == experts && w2_q.size(1) == hdim, kOp, "w2_qweight must be [E=", experts, ", H=", hdim,
              ", I / 8], got ", w2_q.sizes());
  TORCH_CHECK(w13_q.size(1) == 2 * inter, kOp, "w13_qweight must have 2 * I = ", 2 * inter,
              " rows (gate then up) for I=", inter, " from w2_qweight, got ", w13_q.size(1));

  // Resolved group sizes, then scales and zeros of each stack.
  const int64_t g13 = group13 == -1 ? hdim : group13, g2 = group2 == -1 ? inter : group2;
  TORCH_CHECK(g13 > 0 && hdim % g13 == 0, kOp, "group_size13=", group13, " must be -1 or a positive divisor of H=", hdim);
  TORCH_CHECK(g2 > 0 && inter % g2 == 0, kOp, "group_size2=", group2, " must be -1 or a positive divisor of I=", inter);
  auto check_stack = [&](const char* name, const at::Tensor& s, const std::optional<at::Tensor>& z, int64_t rows,
                         int64_t groups) {
    TORCH_CHECK(s.scalar_type() == at::kHalf || s.scalar_type() == at::kBFloat16, kOp, name,
                "_scales must be float16 or bfloat16, got ", s.scalar_type());
    TORCH_CHECK(s.dim() == 3 && s.size(0) == experts && s.size(1) == rows && s.size(2) == groups, kOp, name,
                "_scales must have shape [", experts, ", ", rows, ", ", groups, "], got ", s.sizes());
    TORCH_CHECK(s.is_contiguous(), kOp, name, "_scales must be contiguous");
    if (z.has_value()) {
      TORCH_CHECK(z->scalar_type() == at::kByte, kOp, name, "_qzeros must be uint8, got ", z->scalar_type());
      TORCH_CHECK(z->sizes() == s.sizes(), kOp, name, "_qzeros must have the shape of the scales ", s.sizes(), ", got ",
                  z->sizes());
      TORCH_CHECK(z->is_contiguous(), kOp, name, "_qzeros must be contiguous");
    }
  };
  check_stack("w13", w13_s, w13_z, 2 * inter, hdim / g13);
  check_stack("w2", w2_s, w2_z, hdim, inter / g2);

  auto fdtype = [](at::ScalarType t) {
    return t == at::kHalf ? FloatDType::kFloat16 : t == at::kBFloat16 ? FloatDType::kBFloat16 : FloatDType::kFloat32;
  };
  MoeDecodeParams p;
  p.num_tokens = tokens;
  p.top_k = ids.size(1);
  p.num_experts = experts;
  p.hidden_dim = hdim;
  p.inter_dim = inter;
  p.group13 = g13;
  p.group2 = g2;
  p.act_dtype = fdtype(hidden.scalar_type());
  p.w13_scale_dtype = fdtype(w13_s.scalar_type());
  p.w2_scale_dtype = fdtype(w2_s.scalar_type());
  p.online_hadamard = online_hadamard;
  p.hadamard_scale = inter > 0 ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(inter))) : 1.0f;
  if (const char* why = moe_decode_unsupported(p, /*device=*/-1)) {
    TORCH_CHECK(false, kOp, why, " (H=", hdim, ", I=", inter, ", group sizes ", group13, " / ", group2,
                "); the triton and reference backends of moeq::fused_experts have no such limit");
  }

  TORCH_CHECK(hidden.is_cuda(), kOp, "runs on CUDA tensors only; hidden is on ", hidden.device(),
              " (the reference backend, moeq_kernels.reference.fused_experts_ref, runs anywhere)");
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"top_k_index", &ids}, {"top_k_weights", &weights}, {"w13_qweight", &w13_q}, {"w13_scales", &w13_s},
      {"w2_qweight", &w2_q}, {"w2_scales", &w2_s}, {"w13_qzeros", w13_z ? &*w13_z : nullptr},
      {"w2_qzeros", w2_z ? &*w2_z : nullptr}};
  for (const auto& [name, t] : others) {
    if (t != nullptr) {
      TORCH_CHECK(t->device() == hidden.device(), kOp, name, " must be on ", hidden.device(), " like hidden, got ",
                  t->device());
    }
  }
  // 16-byte loads of whole rows: contiguous stacks from an allocation are aligned, views with an offset may not be.
  for (const auto* q : {&w13_q, &w2_q}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(q->data_ptr()) % 16 == 0, kOp,
                "packed weights must start at a 16-byte aligned address (pass the stack, not an offset view)");
  }
  return p;
}

void check_launch(cudaError_t err, const char* op, const at::Device& device) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed on ", device, ": ", cudaGetErrorString(err),
              err == cudaErrorNoKernelImageForDevice
                  ? " (the extension was not built for this GPU: rebuild with TORCH_CUDA_ARCH_LIST including it)"
                  : "");
}

at::Tensor fused_experts_decode_cuda(const at::Tensor& hidden, const at::Tensor& top_k_index,
                                     const at::Tensor& top_k_weights, const at::Tensor& w13_qweight,
                                     const at::Tensor& w13_scales, const std::optional<at::Tensor>& w13_qzeros,
                                     const at::Tensor& w2_qweight, const at::Tensor& w2_scales,
                                     const std::optional<at::Tensor>& w2_qzeros, int64_t group_size13,
                                     int64_t group_size2, bool online_hadamard) {
  MoeDecodeParams p = check_decode_inputs(hidden, top_k_index, top_k_weights, w13_qweight, w13_scales, w13_qzeros,
                                          w2_qweight, w2_scales, w2_qzeros, group_size13, group_size2,
                                          online_hadamard);
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  if (const char* why = moe_decode_unsupported(p, hidden.get_device())) {
    TORCH_CHECK(false, "moeq_C::fused_experts_decode: ", why, " on ", hidden.device(), " (H=", p.hidden_dim,
                ", I=", p.inter_dim, ")");
  }
  at::Tensor out = at::empty({p.num_tokens, p.hidden_dim}, hidden.options());
  if (p.num_tokens == 0) return out;
  if (p.top_k == 0) return out.zero_();
  // Small per-call tensors: copies only when the caller passed views (fixed sizes: graph-capturable).
  at::Tensor x = hidden.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) x = x.clone();  // 16-byte activation loads
  const auto id_type = top_k_index.scalar_type();
  const at::Tensor ids = (id_type == at::kInt || id_type == at::kLong ? top_k_index : top_k_index.to(at::kLong)).contiguous();
  const auto w_type = top_k_weights.scalar_type();
  const at::Tensor wts =
      (w_type == at::kFloat || w_type == at::kHalf || w_type == at::kBFloat16 ? top_k_weights
                                                                               : top_k_weights.to(at::kFloat))
          .contiguous();
  at::Tensor h = at::empty({p.num_tokens * p.top_k, p.inter_dim}, hidden.options().dtype(at::kFloat));

  p.hidden = x.data_ptr();
  p.topk_ids = ids.data_ptr();
  p.ids_dtype = ids.scalar_type() == at::kInt ? IndexDType::kInt32 : IndexDType::kInt64;
  p.topk_weights = wts.data_ptr();
  p.weights_dtype = wts.scalar_type() == at::kFloat   ? FloatDType::kFloat32
                    : wts.scalar_type() == at::kHalf ? FloatDType::kFloat16
                                                     : FloatDType::kBFloat16;
  p.w13_qweight = w13_qweight.data_ptr<int32_t>();
  p.w13_scales = w13_scales.data_ptr();
  p.w13_qzeros = w13_qzeros.has_value() ? w13_qzeros->data_ptr<uint8_t>() : nullptr;
  p.w2_qweight = w2_qweight.data_ptr<int32_t>();
  p.w2_scales = w2_scales.data_ptr();
  p.w2_qzeros = w2_qzeros.has_value() ? w2_qzeros->data_ptr<uint8_t>() : nullptr;
  p.h = h.data_ptr<float>();
  p.out = out.data_ptr();
  check_launch(moe_decode_launch(p, c10::cuda::getCurrentCUDAStream(hidden.get_device()).stream()),
               "moeq_C::fused_experts_decode", hidden.device());
  return out;
}

// CPU registration: the same checks (the device check is last), then the refusal.
at::Tensor fused_experts_decode_cpu(const at::Tensor& hidden, const at::Tensor& top_k_index,
                                    const at::Tensor& top_k_weights, const at::Tensor& w13_qweight,
                                    const at::Tensor& w13_scales, const std::optional<at::Tensor>& w13_qzeros,
                                    const at::Tensor& w2_qweight, const at::Tensor& w2_scales,
                                    const std::optional<at::Tensor>& w2_qzeros, int64_t group_size13,
                                    int64_t group_size2, bool online_hadamard) {
  check_decode_inputs(hidden, top_k_index, top_k_weights, w13_qweight, w13_scales, w13_qzeros, w2_qweight, w2_scales,
                      w2_qzeros, group_size13, group_size2, online_hadamard);
  TORCH_CHECK(false, "moeq_C::fused_experts_decode: runs on CUDA tensors only");
}

// ---------------------------------------------------------------- hadamard_transform

void check_hadamard_inputs(const at::Tensor& x) {
  constexpr const char* kOp = "moeq_C::hadamard_transform: ";
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              "x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() >= 1, kOp, "x must have at least one dim (the transformed last dim), got a scalar");
  if (const char* why = hadamard_unsupported(x.size(-1), /*device=*/-1)) {
    TORCH_CHECK(false, kOp, "last dim n=", x.size(-1), ": ", why);
  }
  TORCH_CHECK(x.is_cuda(), kOp, "runs on CUDA tensors only; x is on ", x.device(),
              " (the reference backend, moeq_kernels.reference.hadamard_ref, runs anywhere)");
}

at::Tensor hadamard_transform_cuda(const at::Tensor& x, double scale) {
  check_hadamard_inputs(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = x.size(-1);
  if (const char* why = hadamard_unsupported(n, x.get_device())) {
    TORCH_CHECK(false, "moeq_C::hadamard_transform: last dim n=", n, ": ", why, " on ", x.device());
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  HadamardParams p;
  p.x = xc.data_ptr();
  p.y = y.data_ptr();
  p.rows = xc.numel() / n;
  p.n = n;
  p.scale = static_cast<float>(scale);
  p.dtype = x.scalar_type() == at::kFloat  ? FloatDType::kFloat32
            : x.scalar_type() == at::kHalf ? FloatDType::kFloat16
                                           : FloatDType::kBFloat16;
  check_launch(hadamard_launch(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "moeq_C::hadamard_transform", x.device());
  return y;
}

at::Tensor hadamard_transform_cpu(const at::Tensor& x, double scale) {
  check_hadamard_inputs(x);
  TORCH_CHECK(false, "moeq_C::hadamard_transform: runs on CUDA tensors only");
}

}  // namespace
}  // namespace moeq

TORCH_LIBRARY(moeq_C, m) {
  // Where the fake (shape-only) implementation lives, so FakeTensorMode / torch.compile can import it.
  m.set_python_module("moeq_kernels._cuda");
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor? qzeros, int bits, int group_size) -> Tensor");
  m.def(
      "fused_experts_decode(Tensor hidden, Tensor top_k_index, Tensor top_k_weights, Tensor w13_qweight, "
      "Tensor w13_scales, Tensor? w13_qzeros, Tensor w2_qweight, Tensor w2_scales, Tensor? w2_qzeros, "
      "int group_size13, int group_size2, bool online_hadamard) -> Tensor");
  m.def("hadamard_transform(Tensor x, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeq_C, CUDA, m) {
  m.impl("dequantize", &moeq::dequantize_cuda);
  m.impl("fused_experts_decode", &moeq::fused_experts_decode_cuda);
  m.impl("hadamard_transform", &moeq::hadamard_transform_cuda);
}

TORCH_LIBRARY_IMPL(moeq_C, CPU, m) {
  m.impl("dequantize", &moeq::dequantize_cpu);
  m.impl("fused_experts_decode", &moeq::fused_experts_decode_cpu);
  m.impl("hadamard_transform", &moeq::hadamard_transform_cpu);
}

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
