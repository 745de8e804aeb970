"""model.compile: the compiled transformer equals eager within fp32 tolerance in every phase that runs it (rollout
and staircase batch shapes, the training forward/backward with LoRA, the reference pass with the adapter off), and
the staircase's growing batch compiles a bounded number of graphs."""
import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel

from densegrpo_fast.config import LoraConfig
from densegrpo_fast.models.base import compile_transformer
from densegrpo_fast.models.lora import adapter_disabled, add_lora
from densegrpo_fast.rollout.sampler import GuidedVelocity
from conftest import sd3_cond, sd3


def _model():
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    add_lora(m, LoraConfig(r=4, alpha=8, targets=["attn.to_q", "attn.to_v", "attn.add_k_proj"]), sd3(), seed=1)
    with torch.no_grad():  # non-zero LoRA B so the adapter changes the output
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return m


def _cond(B, g):
    return sd3_cond(torch.randn(B, 3, 16, generator=g), torch.randn(B, 8, generator=g),
                        torch.randn(B, 3, 16, generator=g), torch.randn(B, 8, generator=g))


@pytest.mark.slow
def test_compiled_transformer_equals_eager_in_every_phase():
    import torch._dynamo as dynamo
    eager = _model()
    comp = copy.deepcopy(eager)
    compile_transformer(comp, "default")
    dynamo.reset()
    dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(3)
    B = 2
    with torch.no_grad():
        # the staircase's shapes B (1 + j), j = 0..4, each with per-sample timesteps (CFG doubles the batch)
        for j in range(5):
            n = B * (1 + j)
            z, t, cond = torch.randn(n, 4, 8, 8, generator=g), torch.rand(n, generator=g), _cond(n, g)
            ve, vc = GuidedVelocity(eager, 4.5, sd3())(z, t, cond), GuidedVelocity(comp, 4.5, sd3())(z, t, cond)
            torch.testing.assert_close(vc, ve, rtol=1e-4, atol=1e-5)
    graphs_staircase = dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs_staircase <= 2, graphs_staircase  # static first shape, then one dynamic-batch graph
    # training: forward + backward through the LoRA weights, and the reference pass with the adapter disabled
    z, t, cond = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g), _cond(4, g)
    eager.train(), comp.train()
    losses = []
    for m in (eager, comp):
        m.zero_grad()
        v = GuidedVelocity(m, 4.5, sd3())(z, t, cond)
        loss = (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum()
        loss.backward()
        losses.append(loss.detach())
        with torch.no_grad(), adapter_disabled(m):
            losses.append(GuidedVelocity(m, 4.5, sd3())(z, t, cond))
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(losses[3], losses[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(losses[1], GuidedVelocity(eager, 4.5, sd3())(z, t, cond).detach())  # adapter mattered
    ge = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    gc = {n: p.grad for n, p in comp.named_parameters() if p.requires_grad}
    assert ge.keys() == gc.keys() and len(ge) > 0
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-3, atol=1e-5, msg=n)
