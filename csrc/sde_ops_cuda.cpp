// torch binding of csrc/sde_ops_kernels.cu as `densegrpo_fast._C_cuda`: the same entry points as the CPU `_C`.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "sde_ops_checks.h"

namespace densegrpo {
void launch_sde_step(int, int, const void*, const void*, const void*, void*, const float*, const float*, const float*,
                     float*, int64_t, int64_t, cudaStream_t);
void launch_sde_logprob_forward(int, int, const void*, const void*, const void*, const void*, const float*,
                                const float*, float*, float*, int64_t, int64_t, cudaStream_t);
void launch_sde_logprob_backward(int, int, const void*, const void*, const void*, const void*, const float*,
                                 const float*, const float*, const float*, void*, int64_t, int64_t, cudaStream_t);
void launch_grpo_loss(const float*, const float*, const float*, const float*, float*, float*, bool*, int64_t, float,
                      cudaStream_t);
}  // namespace densegrpo

namespace {
constexpr int64_t kChunk = 4096;

constexpr c10::DeviceType kDev = c10::kCUDA;
using densegrpo_checks::check_coef;
using densegrpo_checks::check_latents;
using densegrpo_checks::check_loss_inputs;
using densegrpo_checks::check_out;

// dtype code of the kernels' template switch (float64 is CPU-only; the shared checks reject it here).
int code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16)");
  }
  return 0;
}

at::Tensor partial(int64_t B, int64_t D, const at::Tensor& like) {
  return at::empty({B, (D + kChunk - 1) / kChunk}, like.options().dtype(at::kFloat));
}

at::Tensor row_sum(const at::Tensor& p) { return p.sum(1, /*keepdim=*/false, at::kDouble).to(at::kFloat); }
}  // namespace

std::vector<at::Tensor> sde_step(const at::Tensor& z, const at::Tensor& v, const at::Tensor& noise,
                                 const at::Tensor& alpha, const at::Tensor& c, const at::Tensor& std_,
                                 const c10::optional<at::Tensor>& out) {
  check_latents(z, v, noise, "noise", c10::nullopt, kDev, false);
  const int64_t B = z.size(0), D = z.numel() / std::max<int64_t>(B, 1);
  check_coef(alpha, B, "alpha", kDev); check_coef(c, B, "c", kDev); check_coef(std_, B, "std", kDev);
  const bool has_out = out.has_value() && out->defined();
  if (has_out) check_out(*out, z, "latent", kDev);
  at::Tensor nx = has_out ? *out : at::empty_like(z);
  if (B == 0 || D == 0) return {nx, at::zeros({B}, z.options().dtype(at::kFloat))};  // nothing to launch
  auto p = partial(B, D, z);
  densegrpo::launch_sde_step(code(z), code(v), z.data_ptr(), v.data_ptr(), noise.data_ptr(), nx.data_ptr(),
                             alpha.data_ptr<float>(), c.data_ptr<float>(), std_.data_ptr<float>(),
                             p.data_ptr<float>(), B, D, c10::cuda::getCurrentCUDAStream().stream());
  return {nx, row_sum(p)};
}

std::vector<at::Tensor> sde_logprob_forward(const at::Tensor& z, const at::Tensor& v, const at::Tensor& zn,
                                            const c10::optional<at::Tensor>& vref, const at::Tensor& alpha,
                                            const at::Tensor& c) {
  const bool has_ref = check_latents(z, v, zn, "next_latent", vref, kDev, false);
  const int64_t B = z.size(0), D = z.numel() / std::max<int64_t>(B, 1);
  check_coef(alpha, B, "alpha", kDev); check_coef(c, B, "c", kDev);
  if (B == 0 || D == 0) {
    auto zero = at::zeros({B}, z.options().dtype(at::kFloat));
    return {zero, zero.clone()};
  }
  auto psq = partial(B, D, z), pkq = partial(B, D, z);
  densegrpo::launch_sde_logprob_forward(code(z), code(v), z.data_ptr(), v.data_ptr(), zn.data_ptr(),
                                        has_ref ? vref->data_ptr() : nullptr, alpha.data_ptr<float>(),
                                        c.data_ptr<float>(), psq.data_ptr<float>(), pkq.data_ptr<float>(), B, D,
                                        c10::cuda::getCurrentCUDAStream().stream());
  return {row_sum(psq), row_sum(pkq)};
}

at::Tensor sde_logprob_backward(const at::Tensor& z, const at::Tensor& v, const at::Tensor& zn,
                                const c10::optional<at::Tensor>& vref, const at::Tensor& alpha, const at::Tensor& c,
                                const at::Tensor& g_sq, const at::Tensor& g_kq, const c10::optional<at::Tensor>& out) {
  const bool has_ref = check_latents(z, v, zn, "next_latent", vref, kDev, false);
  const int64_t B = z.size(0), D = z.numel() / std::max<int64_t>(B, 1);
  check_coef(alpha, B, "alpha", kDev); check_coef(c, B, "c", kDev); check_coef(g_sq, B, "g_sq", kDev);
  check_coef(g_kq, B, "g_kq", kDev);
  const bool has_out = out.has_value() && out->defined();
  if (has_out) check_out(*out, v, "velocity", kDev);
  at::Tensor g = has_out ? *out : at::empty_like(v);
  if (B == 0 || D == 0) return g;
  densegrpo::launch_sde_logprob_backward(code(z), code(v), z.data_ptr(), v.data_ptr(), zn.data_ptr(),
                                         has_ref ? vref->data_ptr() : nullptr, alpha.data_ptr<float>(),
                                         c.data_ptr<float>(), g_sq.data_ptr<float>(), g_kq.data_ptr<float>(),
                                         g.data_ptr(), B, D, c10::cuda::getCurrentCUDAStream().stream());
  return g;
}

std::vector<at::Tensor> grpo_loss_forward(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv,
                                          const at::Tensor& w, double clip) {
  check_loss_inputs(lp, old, adv, w, kDev);
  const int64_t N = lp.numel();
  auto per = at::empty_like(lp), grad = at::empty_like(lp);
  auto clipped = at::empty({N}, lp.options().dtype(at::kBool));
  if (N == 0) return {per, grad, clipped};
  densegrpo::launch_grpo_loss(lp.data_ptr<float>(), old.data_ptr<float>(), adv.data_ptr<float>(),
                              w.data_ptr<float>(), per.data_ptr<float>(), grad.data_ptr<float>(),
                              clipped.data_ptr<bool>(), N, static_cast<float>(clip),
                              c10::cuda::getCurrentCUDAStream().stream());
  return {per, grad, clipped};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sde_step", &sde_step, py::arg("z"), py::arg("v"), py::arg("noise"), py::arg("alpha"), py::arg("c"),
        py::arg("std"), py::arg("out") = py::none());
  m.def("sde_logprob_forward", &sde_logprob_forward, py::arg("z"), py::arg("v"), py::arg("zn"), py::arg("vref"),
        py::arg("alpha"), py::arg("c"));
  m.def("sde_logprob_backward", &sde_logprob_backward, py::arg("z"), py::arg("v"), py::arg("zn"), py::arg("vref"),
        py::arg("alpha"), py::arg("c"), py::arg("g_sq"), py::arg("g_kq"), py::arg("out") = py::none());
  m.def("grpo_loss_forward", &grpo_loss_forward);
}
