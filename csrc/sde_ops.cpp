// CPU kernels for the fused ops `sde_step`, `sde_logprob` (forward + backward) and `grpo_loss`.
// The math (ops/reference.py): mu = alpha_b z + c_b v. Per-sample scalars are computed once in torch (fp32);
// these kernels do the passes over C*H*W: one read of each input, one write of each output. Sums: 16 fp32 lanes
// within a chunk of kChunk elements (kChunk/16 = 256 terms per lane), then fp64 across lanes and chunks.
// Parallel over (sample, chunk) with at::parallel_for (OpenMP); the inner loops are `omp simd` vectorised.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "sde_ops_checks.h"

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kChunk = 4096;  // elements per task: 16 KiB of fp32 per input stream
constexpr int kLanes = 16;

template <typename T>
inline float f32(T x) { return static_cast<float>(x); }

#define DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

constexpr c10::DeviceType kDev = c10::kCPU;
using densegrpo_checks::check_coef;
using densegrpo_checks::check_latents;
using densegrpo_checks::check_loss_inputs;
using densegrpo_checks::check_out;

// Sum the per-chunk partial sums of each row (fixed order: deterministic).
at::Tensor reduce_rows(const std::vector<double>& part, int64_t B, int64_t nch) {
  auto out = at::empty({B}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    double s = 0.0;
    for (int64_t j = 0; j < nch; ++j) s += part[b * nch + j];
    o[b] = static_cast<float>(s);
  }
  return out;
}

}  // namespace

template <typename zt, typename vt>
void sde_step_kernel(const zt* pz, const vt* pv, const zt* pn, zt* po, const float* pa, const float* pc,
                     const float* ps, int64_t B, int64_t D, int64_t nch, double* part) {
  at::parallel_for(0, B * nch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / nch, s = (t % nch) * kChunk, e = std::min(D, s + kChunk);
      const float a = pa[b], cc = pc[b], sd = ps[b];
      const int64_t off = b * D;
      float lane[kLanes] = {0.0f};
      int64_t i = s;
      for (; i + kLanes <= e; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const float mu = a * f32(pz[off + i + l]) + cc * f32(pv[off + i + l]);
          const zt nx = static_cast<zt>(mu + sd * f32(pn[off + i + l]));
          po[off + i + l] = nx;
          const float d = f32(nx) - mu;
          lane[l] += d * d;
        }
      }
      for (; i < e; ++i) {
        const float mu = a * f32(pz[off + i]) + cc * f32(pv[off + i]);
        const zt nx = static_cast<zt>(mu + sd * f32(pn[off + i]));
        po[off + i] = nx;
        const float d = f32(nx) - mu;
        lane[0] += d * d;
      }
      double acc = 0.0;
      for (int l = 0; l < kLanes; ++l) acc += lane[l];
      part[t] = acc;
    }
  });
}

// sde_step: z, v, noise (B, ...) -> next = alpha z + c v + std noise (z's dtype), sq (B,) = sum (next - mu)^2.
std::vector<at::Tensor> sde_step(const at::Tensor& z, const at::Tensor& v, const at::Tensor& noise,
                                 const at::Tensor& alpha, const at::Tensor& c, const at::Tensor& std_,
                                 const c10::optional<at::Tensor>& out) {
  check_latents(z, v, noise, "noise", c10::nullopt, kDev, true);
  const int64_t B = z.size(0), D = z.numel() / std::max<int64_t>(B, 1);
  check_coef(alpha, B, "alpha", kDev); check_coef(c, B, "c", kDev); check_coef(std_, B, "std", kDev);
  at::Tensor next;
  if (out.has_value() && out->defined()) {
    check_out(*out, z, "latent", kDev);
    next = *out;
  } else {
    next = at::empty_like(z);
  }
  const int64_t nch = (D + kChunk - 1) / kChunk;
  std::vector<double> part(B * nch, 0.0);
  DISPATCH_FLOAT(z.scalar_type(), "sde_step", [&] {
    using zt = scalar_t;
    DISPATCH_FLOAT(v.scalar_type(), "sde_step_v", [&] {
      sde_step_kernel<zt, scalar_t>(z.data_ptr<zt>(), v.data_ptr<scalar_t>(), noise.data_ptr<zt>(),
                                    next.data_ptr<zt>(), alpha.data_ptr<float>(), c.data_ptr<float>(),
                                    std_.data_ptr<float>(), B, D, nch, part.data());
    });
  });
  return {next, reduce_rows(part, B, nch)};
}

template <typename zt, typename vt, bool kRef>
void sde_logprob_forward_kernel(const zt* pz, const vt* pv, const zt* pn, const vt* pr, const float* pa,
                                const float* pc, int64_t B, int64_t D, int64_t nch, double* psq, double* pkq) {
  at::parallel_for(0, B * nch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / nch, s = (t % nch) * kChunk, e = std::min(D, s + kChunk);
      const float a = pa[b], cc = pc[b];
      const int64_t off = b * D;
      // 16 explicit fp32 lanes: GCC vectorises this reliably (an `omp simd reduction` here ran scalar: 2.2 ms vs
      // 0.5 ms for B=32 x 16x64x64 on 2 EPYC cores).
      float lane[kLanes] = {0.0f}, lanek[kLanes] = {0.0f};
      int64_t i = s;
      for (; i + kLanes <= e; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const float vi = f32(pv[off + i + l]);
          const float d = f32(pn[off + i + l]) - (a * f32(pz[off + i + l]) + cc * vi);
          lane[l] += d * d;
          if constexpr (kRef) {
            const float k = vi - f32(pr[off + i + l]);
            lanek[l] += k * k;
          }
        }
      }
      for (; i < e; ++i) {
        const float vi = f32(pv[off + i]);
        const float d = f32(pn[off + i]) - (a * f32(pz[off + i]) + cc * vi);
        lane[0] += d * d;
        if constexpr (kRef) {
          const float k = vi - f32(pr[off + i]);
          lanek[0] += k * k;
        }
      }
      double acc = 0.0, acck = 0.0;
      for (int l = 0; l < kLanes; ++l) {
        acc += lane[l];
        acck += lanek[l];
      }
      psq[t] = acc;
      pkq[t] = acck;
    }
  });
}

// sde_logprob forward: sq (B,) = sum (zn - alpha z - c v)^2, kq (B,) = sum (v - v_ref)^2 (0 without v_ref).
std::vector<at::Tensor> sde_logprob_forward(const at::Tensor& z, const at::Tensor& v, const at::Tensor& zn,
                                            const c10::optional<at::Tensor>& vref, const at::Tensor& alpha,
                                            const at::Tensor& c) {
  const bool has_ref = check_latents(z, v, zn, "next_latent", vref, kDev, true);
  const int64_t B = z.size(0), D = z.numel() / std::max<int64_t>(B, 1);
  check_coef(alpha, B, "alpha", kDev); check_coef(c, B, "c", kDev);
  const int64_t nch = (D + kChunk - 1) / kChunk;
  std::vector<double> psq(B * nch, 0.0), pkq(B * nch, 0.0);
  DISPATCH_FLOAT(z.scalar_type(), "sde_logprob_forward", [&] {
    using zt = scalar_t;
    DISPATCH_FLOAT(v.scalar_type(), "sde_logprob_forward_v", [&] {
      using vt = scalar_t;
      if (has_ref)
        sde_logprob_forward_kernel<zt, vt, true>(z.data_ptr<zt>(), v.data_ptr<vt>(), zn.data_ptr<zt>(),
                                                 vref->data_ptr<vt>(), alpha.data_ptr<float>(), c.data_ptr<float>(),
                                                 B, D, nch, psq.data(), pkq.data());
      else
        sde_logprob_forward_kernel<zt, vt, false>(z.data_ptr<zt>(), v.data_ptr<vt>(), zn.data_ptr<zt>(), nullptr,
                                                  alpha.data_ptr<float>(), c.data_ptr<float>(), B, D, nch,
                                                  psq.data(), pkq.data());
    });
  });
  return {reduce_rows(psq, B, nch), reduce_rows(pkq, B, nch)};
}

template <typename zt, typename vt, bool kRef>
void sde_logprob_backward_kernel(const zt* pz, const vt* pv, const zt* pn, const vt* pr, const float* pa,
                                 const float* pc, const float* gs, const float* gk, vt* po, int64_t B, int64_t D,
                                 int64_t nch) {
  at::parallel_for(0, B * nch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / nch, s = (t % nch) * kChunk, e = std::min(D, s + kChunk);
      const float a = pa[b], cc = pc[b], ws = -2.0f * cc * gs[b], wk = 2.0f * gk[b];
      const int64_t off = b * D;
#pragma omp simd
      for (int64_t i = s; i < e; ++i) {
        const float vi = f32(pv[off + i]);
        const float d = f32(pn[off + i]) - (a * f32(pz[off + i]) + cc * vi);
        float g = ws * d;
        if constexpr (kRef) g += wk * (vi - f32(pr[off + i]));
        po[off + i] = static_cast<vt>(g);
      }
    }
  });
}

// sde_logprob backward: grad_v = g_sq_b * (-2 c_b (zn - alpha_b z - c_b v)) + g_kq_b * 2 (v - v_ref), v's dtype.
at::Tensor sde_logprob_backward(const at::Tensor& z, const at::Tensor& v, const at::Tensor& zn,
                                const c10::optional<at::Tensor>& vref, const at::Tensor& alpha, const at::Tensor& c,
                                const at::Tensor& g_sq, const at::Tensor& g_kq,
                                const c10::optional<at::Tensor>& out) {
  const bool has_ref = check_latents(z, v, zn, "next_latent", vref, kDev, true);
  const int64_t B = z.size(0), D = z.numel() / std::max<int64_t>(B, 1);
  check_coef(alpha, B, "alpha", kDev); check_coef(c, B, "c", kDev); check_coef(g_sq, B, "g_sq", kDev); check_coef(g_kq, B, "g_kq", kDev);
  at::Tensor grad;
  if (out.has_value() && out->defined()) {
    check_out(*out, v, "velocity", kDev);
    grad = *out;
  } else {
    grad = at::empty_like(v);
  }
  const int64_t nch = (D + kChunk - 1) / kChunk;
  DISPATCH_FLOAT(z.scalar_type(), "sde_logprob_backward", [&] {
    using zt = scalar_t;
    DISPATCH_FLOAT(v.scalar_type(), "sde_logprob_backward_v", [&] {
      using vt = scalar_t;
      if (has_ref)
        sde_logprob_backward_kernel<zt, vt, true>(z.data_ptr<zt>(), v.data_ptr<vt>(), zn.data_ptr<zt>(),
                                                  vref->data_ptr<vt>(), alpha.data_ptr<float>(), c.data_ptr<float>(),
                                                  g_sq.data_ptr<float>(), g_kq.data_ptr<float>(),
                                                  grad.data_ptr<vt>(), B, D, nch);
      else
        sde_logprob_backward_kernel<zt, vt, false>(z.data_ptr<zt>(), v.data_ptr<vt>(), zn.data_ptr<zt>(), nullptr,
                                                   alpha.data_ptr<float>(), c.data_ptr<float>(),
                                                   g_sq.data_ptr<float>(), g_kq.data_ptr<float>(),
                                                   grad.data_ptr<vt>(), B, D, nch);
    });
  });
  return grad;
}

// grpo_loss forward over N samples (fp32): per_i = w_i max(-A rho, -A clip(rho)), grad_i = d per_i / d logp_i,
// clipped_i = |rho - 1| > eps. The mean and the KL term are taken in torch.
std::vector<at::Tensor> grpo_loss_forward(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv,
                                          const at::Tensor& w, double clip) {
  const int64_t N = lp.numel();
  check_loss_inputs(lp, old, adv, w, kDev);
  auto per = at::empty({N}, lp.options()), grad = at::empty({N}, lp.options());
  auto clipped = at::empty({N}, lp.options().dtype(at::kBool));
  const float *pl = lp.data_ptr<float>(), *po = old.data_ptr<float>(), *pa = adv.data_ptr<float>(),
              *pw = w.data_ptr<float>();
  float *pp = per.data_ptr<float>(), *pg = grad.data_ptr<float>();
  bool* pc = clipped.data_ptr<bool>();
  const float lo = 1.0f - static_cast<float>(clip), hi = 1.0f + static_cast<float>(clip);
  for (int64_t i = 0; i < N; ++i) {
    const float rho = std::exp(pl[i] - po[i]);
    const float rc = std::min(std::max(rho, lo), hi);
    const float u = -pa[i] * rho, cl = -pa[i] * rc;
    pp[i] = pw[i] * std::max(u, cl);
    // d/dlogp: -A rho when the unclipped term is the max or the clamp is inactive; 0 when the clipped term wins.
    const bool inside = rho >= lo && rho <= hi;
    pg[i] = (inside || u > cl) ? pw[i] * u : 0.0f;
    pc[i] = std::abs(rho - 1.0f) > static_cast<float>(clip);
  }
  return {per, grad, clipped};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "densegrpo_fast CPU ops (OpenMP): sde_step, sde_logprob_forward/backward, grpo_loss_forward";
  m.def("sde_step", &sde_step, "fused SDE step: next latent and sum of squared residuals", py::arg("z"),
        py::arg("v"), py::arg("noise"), py::arg("alpha"), py::arg("c"), py::arg("std"), py::arg("out") = py::none());
  m.def("sde_logprob_forward", &sde_logprob_forward, "per-sample sums for log-prob and KL", py::arg("z"),
        py::arg("v"), py::arg("zn"), py::arg("vref"), py::arg("alpha"), py::arg("c"));
  m.def("sde_logprob_backward", &sde_logprob_backward, "velocity gradient of the fused log-prob/KL", py::arg("z"),
        py::arg("v"), py::arg("zn"), py::arg("vref"), py::arg("alpha"), py::arg("c"), py::arg("g_sq"),
        py::arg("g_kq"), py::arg("out") = py::none());
  m.def("grpo_loss_forward", &grpo_loss_forward, "per-sample clipped GRPO loss, its gradient, clip flags");
}
