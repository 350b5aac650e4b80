"""Fused (chunked) NELBO against the kernel's reference path."""

import pytest
import torch

from xdlm import MixedKernel
from xdlm.core.fused import fused_diffusion_loss, fused_nelbo
from xdlm.core.objective import diffusion_loss
from xdlm.core.schedules import make_schedule
from xdlm.models.dit import DiT, DiTConfig

KERNELS = {
    "k0": lambda V: MixedKernel.mdlm(V, V - 1),
    "k0.1": lambda V: MixedKernel(V, V - 1, 0.1),
    "k0.5": lambda V: MixedKernel(V, 2, 0.5),
    "k1-mask": lambda V: MixedKernel(V, V - 1, 1.0),
    "k1-nomask": lambda V: MixedKernel.udlm(V),
}


def _case(kern, dtype, B=3, L=7, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = kern.vocab_size
    hidden = torch.randn(B, L, D, generator=g, dtype=dtype) * 2
    weight = torch.randn(V, D, generator=g, dtype=dtype)
    bias = torch.randn(V, generator=g, dtype=dtype)
    hi = V - 1 if kern.mask_id == V - 1 else V  # data tokens are never the mask
    x0 = torch.randint(hi, (B, L), generator=g)
    x0 = torch.where(x0 == kern.mask_id, (x0 + 1) % hi, x0) if kern.mask_id is not None else x0
    alpha = torch.rand(B, generator=g, dtype=dtype) * 0.9 + 0.05
    z = kern.sample_marginal(x0, alpha, generator=g)
    z[0, :2] = x0[0, :2]  # make sure clean, corrupted and (if any) masked positions all occur
    return hidden, weight, bias, x0, z, alpha, -torch.ones(B, dtype=dtype) * 0.999


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward(torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape))
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_fused_equals_unfused_values_and_gradients(name, dtype, tol, chunk):
    kern = KERNELS[name](11)
    h, w, b, x0, z, alpha, dalpha = _case(kern, dtype)

    def ref(h, w, b):
        return kern.nelbo(h @ w.T + b, x0, z, alpha, dalpha)

    def fused(h, w, b):
        return fused_nelbo(h, w, kern, x0, z, alpha, dalpha, chunk_size=chunk, bias=b)

    out_ref, g_ref = _grads(ref, h, w, b)
    out, g = _grads(fused, h, w, b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    for a, r in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)


def test_fused_gradcheck_and_no_bias():
    kern = MixedKernel(7, 6, 0.3)
    h, w, _, x0, z, alpha, dalpha = _case(kern, torch.float64, B=2, L=3, D=3)
    fn = lambda h, w: fused_nelbo(h, w, kern, x0, z, alpha, dalpha, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), w.requires_grad_()))


def test_fused_bf16_autocast_close_to_unfused():
    kern = MixedKernel(50, 49, 0.1)
    h, w, _, x0, z, alpha, dalpha = _case(kern, torch.float32, B=2, L=16, D=32)
    with torch.autocast("cpu", torch.bfloat16):
        out_ref, g_ref = _grads(lambda h, w: kern.nelbo(h @ w.T, x0, z, alpha, dalpha), h, w)
        out, g = _grads(
            lambda h, w: fused_nelbo(h, w, kern, x0, z, alpha, dalpha, chunk_size=5), h, w
        )
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g, g_ref, strict=True):
        assert a.dtype == r.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)


def test_fused_diffusion_loss_matches_diffusion_loss_on_dit():
    V = 37
    kern = MixedKernel(V, V - 1, 0.1)
    model = DiT(DiTConfig.from_preset("tiny", V, n_layers=1, d_model=16, n_heads=2))
    sched = make_schedule("loglinear")
    x0 = torch.randint(V - 1, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[2, 6:] = False
    outs = []
    for loss_fn in (diffusion_loss, fused_diffusion_loss):
        model.zero_grad()
        g = torch.Generator().manual_seed(5)
        out = loss_fn(model, kern, sched, x0, attention_mask=mask, generator=g)
        out.nats.backward()
        outs.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (ref, g_ref), (fus, g_fus) = outs
    assert torch.equal(ref.z_t, fus.z_t) and torch.equal(ref.t, fus.t)
    assert ref.tokens == fus.tokens == mask.sum()
    torch.testing.assert_close(fus.per_token, ref.per_token, rtol=1e-5, atol=1e-6)
    assert (fus.per_token[~mask] == 0).all()
    for a, r in zip(g_fus, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_fused_rejects_bad_shapes():
    kern = MixedKernel(5, 4, 0.1)
    h, w, _, x0, z, alpha, dalpha = _case(kern, torch.float32)
    with pytest.raises(ValueError, match="same D"):
        fused_nelbo(h, w[:, :2], kern, x0, z, alpha, dalpha)
    with pytest.raises(ValueError, match="alpha"):
        fused_nelbo(h, w, kern, x0, z, alpha[:1], dalpha)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_nelbo(h, w, kern, x0, z, alpha, dalpha, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_nelbo(h, w[:4], kern, x0, z, alpha, dalpha)
