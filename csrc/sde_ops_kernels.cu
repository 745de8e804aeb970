// CUDA kernels for `sde_step`, `sde_logprob` (forward, backward), `grpo_loss`: the same math as csrc/sde_ops.cpp and
// kernels/*.py (see densegrpo_fast/ops/reference.py). Plain CUDA C++ (no torch headers), so that this file compiles
// with nvcc alone (`make cuda-check`, and the test suite on a machine with nvcc but no GPU); csrc/sde_ops_cuda.cpp
// binds it to torch. Grid (chunks, B); each block reduces its chunk with warp shuffles into one fp32 partial.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace densegrpo {

constexpr int kThreads = 256;
constexpr int kChunk = 4096;  // elements per block: 16 per thread

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

__device__ __forceinline__ float f32(float x) { return x; }
__device__ __forceinline__ float f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}

template <typename zt, typename vt>
__global__ void sde_step_kernel(const zt* __restrict__ z, const vt* __restrict__ v, const zt* __restrict__ noise,
                                zt* __restrict__ out, const float* __restrict__ alpha, const float* __restrict__ c,
                                const float* __restrict__ sd, float* __restrict__ part, int64_t D) {
  const int64_t b = blockIdx.y, j = blockIdx.x, row = b * D;
  const float a = alpha[b], cc = c[b], s = sd[b];
  float acc = 0.0f;
  const int64_t end = min(D, (j + 1) * (int64_t)kChunk);
  for (int64_t i = j * kChunk + threadIdx.x; i < end; i += kThreads) {
    const float mu = a * f32(z[row + i]) + cc * f32(v[row + i]);
    const zt nx = from_f32<zt>(mu + s * f32(noise[row + i]));
    out[row + i] = nx;
    const float d = f32(nx) - mu;
    acc += d * d;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) part[b * gridDim.x + j] = acc;
}

template <typename zt, typename vt, bool kRef>
__global__ void sde_logprob_fwd_kernel(const zt* __restrict__ z, const vt* __restrict__ v, const zt* __restrict__ zn,
                                       const vt* __restrict__ vref, const float* __restrict__ alpha,
                                       const float* __restrict__ c, float* __restrict__ psq, float* __restrict__ pkq,
                                       int64_t D) {
  const int64_t b = blockIdx.y, j = blockIdx.x, row = b * D;
  const float a = alpha[b], cc = c[b];
  float acc = 0.0f, acck = 0.0f;
  const int64_t end = min(D, (j + 1) * (int64_t)kChunk);
  for (int64_t i = j * kChunk + threadIdx.x; i < end; i += kThreads) {
    const float vi = f32(v[row + i]);
    const float d = f32(zn[row + i]) - (a * f32(z[row + i]) + cc * vi);
    acc += d * d;
    if (kRef) {
      const float k = vi - f32(vref[row + i]);
      acck += k * k;
    }
  }
  acc = block_sum(acc);
  __syncthreads();
  if (kRef) acck = block_sum(acck);
  if (threadIdx.x == 0) {
    psq[b * gridDim.x + j] = acc;
    pkq[b * gridDim.x + j] = kRef ? acck : 0.0f;
  }
}

template <typename zt, typename vt, bool kRef>
__global__ void sde_logprob_bwd_kernel(const zt* __restrict__ z, const vt* __restrict__ v, const zt* __restrict__ zn,
                                       const vt* __restrict__ vref, const float* __restrict__ alpha,
                                       const float* __restrict__ c, const float* __restrict__ g_sq,
                                       const float* __restrict__ g_kq, vt* __restrict__ out, int64_t D) {
  const int64_t b = blockIdx.y, j = blockIdx.x, row = b * D;
  const float a = alpha[b], cc = c[b], ws = -2.0f * cc * g_sq[b], wk = 2.0f * g_kq[b];
  const int64_t end = min(D, (j + 1) * (int64_t)kChunk);
  for (int64_t i = j * kChunk + threadIdx.x; i < end; i += kThreads) {
    const float vi = f32(v[row + i]);
    float g = ws * (f32(zn[row + i]) - (a * f32(z[row + i]) + cc * vi));
    if (kRef) g += wk * (vi - f32(vref[row + i]));
    out[row + i] = from_f32<vt>(g);
  }
}

__global__ void grpo_loss_kernel(const float* __restrict__ lp, const float* __restrict__ old,
                                 const float* __restrict__ adv, const float* __restrict__ w, float* __restrict__ per,
                                 float* __restrict__ grad, bool* __restrict__ clipped, int64_t N, float eps) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= N) return;
  const float rho = expf(lp[i] - old[i]);
  const float rc = fminf(fmaxf(rho, 1.0f - eps), 1.0f + eps);
  const float u = -adv[i] * rho, cl = -adv[i] * rc;
  per[i] = w[i] * fmaxf(u, cl);
  const bool inside = rho >= 1.0f - eps && rho <= 1.0f + eps;
  grad[i] = (inside || u > cl) ? w[i] * u : 0.0f;
  clipped[i] = fabsf(rho - 1.0f) > eps;
}

inline dim3 grid_for(int64_t B, int64_t D) { return dim3((unsigned)((D + kChunk - 1) / kChunk), (unsigned)B); }

// Type switch: zt in {f32, f16, bf16}, vt in {f32, f16, bf16}.
#define DG_DISPATCH_V(VT, ...)                                      \
  switch (VT) {                                                     \
    case kF32: { using vt = float; __VA_ARGS__; break; }            \
    case kF16: { using vt = __half; __VA_ARGS__; break; }           \
    default: { using vt = __nv_bfloat16; __VA_ARGS__; break; }      \
  }
#define DG_DISPATCH(ZT, VT, ...)                                                 \
  switch (ZT) {                                                                  \
    case kF32: { using zt = float; DG_DISPATCH_V(VT, __VA_ARGS__); break; }      \
    case kF16: { using zt = __half; DG_DISPATCH_V(VT, __VA_ARGS__); break; }     \
    default: { using zt = __nv_bfloat16; DG_DISPATCH_V(VT, __VA_ARGS__); break; } \
  }

void launch_sde_step(int zcode, int vcode, const void* z, const void* v, const void* noise, void* out,
                     const float* alpha, const float* c, const float* sd, float* part, int64_t B, int64_t D,
                     cudaStream_t stream) {
  DG_DISPATCH(zcode, vcode, (sde_step_kernel<zt, vt><<<grid_for(B, D), kThreads, 0, stream>>>(
      (const zt*)z, (const vt*)v, (const zt*)noise, (zt*)out, alpha, c, sd, part, D)));
}

void launch_sde_logprob_forward(int zcode, int vcode, const void* z, const void* v, const void* zn, const void* vref,
                                const float* alpha, const float* c, float* psq, float* pkq, int64_t B, int64_t D,
                                cudaStream_t stream) {
  if (vref) {
    DG_DISPATCH(zcode, vcode, (sde_logprob_fwd_kernel<zt, vt, true><<<grid_for(B, D), kThreads, 0, stream>>>(
        (const zt*)z, (const vt*)v, (const zt*)zn, (const vt*)vref, alpha, c, psq, pkq, D)));
  } else {
    DG_DISPATCH(zcode, vcode, (sde_logprob_fwd_kernel<zt, vt, false><<<grid_for(B, D), kThreads, 0, stream>>>(
        (const zt*)z, (const vt*)v, (const zt*)zn, nullptr, alpha, c, psq, pkq, D)));
  }
}

void launch_sde_logprob_backward(int zcode, int vcode, const void* z, const void* v, const void* zn,
                                 const void* vref, const float* alpha, const float* c, const float* g_sq,
                                 const float* g_kq, void* out, int64_t B, int64_t D, cudaStream_t stream) {
  if (vref) {
    DG_DISPATCH(zcode, vcode, (sde_logprob_bwd_kernel<zt, vt, true><<<grid_for(B, D), kThreads, 0, stream>>>(
        (const zt*)z, (const vt*)v, (const zt*)zn, (const vt*)vref, alpha, c, g_sq, g_kq, (vt*)out, D)));
  } else {
    DG_DISPATCH(zcode, vcode, (sde_logprob_bwd_kernel<zt, vt, false><<<grid_for(B, D), kThreads, 0, stream>>>(
        (const zt*)z, (const vt*)v, (const zt*)zn, nullptr, alpha, c, g_sq, g_kq, (vt*)out, D)));
  }
}

void launch_grpo_loss(const float* lp, const float* old, const float* adv, const float* w, float* per, float* grad,
                      bool* clipped, int64_t N, float eps, cudaStream_t stream) {
  grpo_loss_kernel<<<(unsigned)((N + 255) / 256), 256, 0, stream>>>(lp, old, adv, w, per, grad, clipped, N, eps);
}

}  // namespace densegrpo
