// Input checks shared by the CPU (`_C`, sde_ops.cpp) and CUDA (`_C_cuda`, sde_ops_cuda.cpp) bindings of the fused
// ops, so that both reject the same bad inputs with the same messages. `dev` is the device type the binding runs
// on (kCPU or kCUDA); every tensor must live there, be contiguous and have the shape and dtype the op expects.
#pragma once
#include <torch/extension.h>

namespace densegrpo_checks {

inline const char* dev_name(c10::DeviceType dev) { return dev == c10::kCUDA ? "CUDA" : "CPU"; }

inline void check_float_dtype(const at::Tensor& t, const char* name, bool allow_double) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || (allow_double && s == at::kDouble),
              name, " has unsupported dtype ", s, " (float32, float16, bfloat16", allow_double ? ", float64)" : ")");
}

// t lives on `dev`, is contiguous and has the shape of `like`.
inline void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name, c10::DeviceType dev) {
  TORCH_CHECK(t.device().type() == dev, name, " must be a ", dev_name(dev), " tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the latent is on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == like.sizes(), name, " has shape ", t.sizes(), ", expected ", like.sizes());
}

// Shared prologue of the latent ops: z (B, ...) contiguous on `dev` with at least one dimension; v and x (the noise
// or the next latent) shaped like z; x with z's dtype; an optional v_ref with v's shape and dtype.
// Returns whether v_ref is present.
inline bool check_latents(const at::Tensor& z, const at::Tensor& v, const at::Tensor& x, const char* xname,
                          const c10::optional<at::Tensor>& vref, c10::DeviceType dev, bool allow_double) {
  TORCH_CHECK(z.dim() >= 1, "latent must have a batch dimension");
  TORCH_CHECK(z.device().type() == dev, "latent must be a ", dev_name(dev), " tensor, got ", z.device());
  TORCH_CHECK(z.is_contiguous(), "latent must be contiguous");
  check_float_dtype(z, "latent", allow_double);
  check_float_dtype(v, "velocity", allow_double);
  check_rows(v, z, "velocity", dev);
  check_rows(x, z, xname, dev);
  TORCH_CHECK(x.scalar_type() == z.scalar_type(), xname, " must have the latent's dtype ", z.scalar_type(),
              ", got ", x.scalar_type());
  const bool has_ref = vref.has_value() && vref->defined();
  if (has_ref) {
    check_rows(*vref, z, "ref_velocity", dev);
    TORCH_CHECK(vref->scalar_type() == v.scalar_type(), "ref_velocity must have the velocity's dtype ",
                v.scalar_type(), ", got ", vref->scalar_type());
  }
  return has_ref;
}

// A per-sample coefficient: contiguous float32 on `dev` with B elements.
inline void check_coef(const at::Tensor& t, int64_t B, const char* name, c10::DeviceType dev) {
  TORCH_CHECK(t.device().type() == dev && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == B,
              name, " must be a contiguous float32 ", dev_name(dev), " tensor of B=", B, " elements, got ",
              t.scalar_type(), " on ", t.device(), " with ", t.numel(), " elements");
}

// An optional output buffer: shaped like `like`, with `like`'s dtype, on `dev`.
inline void check_out(const at::Tensor& out, const at::Tensor& like, const char* what, c10::DeviceType dev) {
  check_rows(out, like, "out", dev);
  TORCH_CHECK(out.scalar_type() == like.scalar_type(), "out must have the ", what, "'s dtype ", like.scalar_type(),
              ", got ", out.scalar_type());
}

// grpo_loss inputs: four contiguous float32 tensors of N elements on `dev`.
inline void check_loss_inputs(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv,
                              const at::Tensor& w, c10::DeviceType dev) {
  const int64_t N = lp.numel();
  const char* names[4] = {"log_prob", "old_log_prob", "advantages", "weights"};
  const at::Tensor* ts[4] = {&lp, &old, &adv, &w};
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK(ts[i]->scalar_type() == at::kFloat && ts[i]->is_contiguous() && ts[i]->numel() == N &&
                    ts[i]->device().type() == dev,
                "grpo_loss: ", names[i], " must be a contiguous float32 ", dev_name(dev), " tensor of N=", N,
                " elements, got ", ts[i]->scalar_type(), " on ", ts[i]->device(), " with ", ts[i]->numel(),
                " elements");
}

}  // namespace densegrpo_checks
