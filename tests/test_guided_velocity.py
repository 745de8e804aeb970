"""GuidedVelocity's training split (train.cfg_grad=cond): the same value and the same gradient as a joint forward
over [uncond; cond] with the unconditional half detached (Flow-GRPO's train_sd3.py), in fp64."""
import torch
from diffusers import SD3Transformer2DModel

from densegrpo_fast.config import LoraConfig
from densegrpo_fast.models.lora import add_lora
from densegrpo_fast.rollout.sampler import GuidedVelocity
from conftest import sd3_cond, sd3


def test_split_cfg_equals_joint_forward_with_detached_uncond():
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    add_lora(m, LoraConfig(r=4, alpha=8, targets=["attn.to_q", "attn.to_v"]), sd3(), seed=1)
    m = m.double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(2)
    B = 3
    cond = sd3_cond(*(torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, 3, 16), (B, 8),
                                                                                       (B, 3, 16), (B, 8))))
    z, t = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64), torch.rand(B, generator=g)
    w = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64)
    params = [p for p in m.parameters() if p.requires_grad]

    # reference: one joint forward, unconditional half detached, w = 4.5
    out = m(hidden_states=torch.cat([z, z]), timestep=torch.cat([t, t]) * 1000.0,
            encoder_hidden_states=torch.cat([cond.neg_embeds, cond.embeds]),
            pooled_projections=torch.cat([cond.neg_pooled, cond.pooled]), return_dict=False)[0]
    vu, vc = out.chunk(2)
    v_ref = vu.detach() + 4.5 * (vc - vu.detach())
    g_ref = torch.autograd.grad((v_ref * w).sum(), params)

    gv = GuidedVelocity(m, 4.5, sd3(), grad_uncond=False)
    v = gv(z, t, cond)
    g_split = torch.autograd.grad((v * w).sum(), params)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_split, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert gv.nfe == 2 * B
    # grad_uncond=True differentiates both branches: a different gradient (the LoRA acts on the uncond rows too)
    g_both = torch.autograd.grad((GuidedVelocity(m, 4.5, sd3())(z, t, cond) * w).sum(), params)
    assert any(not torch.allclose(a, b) for a, b in zip(g_both, g_ref))
