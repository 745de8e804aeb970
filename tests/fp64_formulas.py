"""Hand-written fp64 formulas straight from docs/algorithms.md §1-2, independent of ops/reference.py's
(alpha, c) factorisation: the ground truth the reference itself is tested against."""
import math



def sde_mean_std(z, v, sig, k, a, variant):
    """-> mean (B,...), std (scalar), kl_std (scalar) for one step k with uniform noise level a, fp64."""
    s_k, s_n = float(sig[k]), float(sig[k + 1])
    dt = s_n - s_k
    if variant == "sde":
        denom = 1 - (float(sig[1]) if s_k == 1.0 else s_k)
        s = a * math.sqrt(s_k / denom)
        mean = z + (v + s * s / (2 * s_k) * (z + (1 - s_k) * v)) * dt
        return mean, s * math.sqrt(-dt), s
    std = s_n * math.sin(a * math.pi / 2)
    x0 = z - s_k * v
    x1 = z + (1 - s_k) * v
    mean = (1 - s_n) * x0 + math.sqrt(s_n ** 2 - std ** 2) * x1
    return mean, std, std


def logprob(x, mean, std, reduction="mean"):
    per = -(x - mean) ** 2 / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    per = per.flatten(1)
    return per.mean(1) if reduction == "mean" else per.sum(1)
