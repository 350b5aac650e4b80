"""Fused (chunked) NELBO against the kernel's reference path."""

import pytest
import torch

import xdlm.core.fused as fused_mod
from xdlm import MixedKernel
from xdlm.core.fused import fused_diffusion_loss, fused_nelbo
from xdlm.core.fused_chunk import RowTargets, stat_grads
from xdlm.core.fused_plan import ChunkProbe, candidates
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


def _grads(fn, reduce, *tensors):
    """ℓ = fn(*tensors) and the gradients of reduce(ℓ) (a scalar) into the tensors."""
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    reduce(out).backward()
    return out.detach(), [t.grad for t in tensors]


def _weighted(out):
    return (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()


def _no_recompute(monkeypatch):
    """Make the recompute backward fail: the stored-gradient path must not need it."""

    def fail(*args):
        raise AssertionError("stored gradients were not used")

    monkeypatch.setattr(fused_mod, "_recompute_grads", fail)


GRID = [(torch.float64, 1e-10, c, m) for c in (1, 4, None) for m in ("sum", "weighted", "general")]
GRID += [(torch.float32, 2e-4, 4, m) for m in ("sum", "general")]


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("dtype,tol,chunk,mode", GRID)
@pytest.mark.parametrize("recompute", [False, True])
def test_fused_equals_unfused_values_and_gradients(
    name, dtype, tol, chunk, mode, recompute, monkeypatch
):
    """Values and ∂h, ∂W, ∂b equal the unfused loss, for every k, chunking and incoming gradient.

    "sum": ℓ.sum() (stored gradients, scale 1); "weighted": a padding mask m given as row_weight
    and where(m, ℓ, 0).sum() / 3 (stored, scale 1/3); "general": a per-row gradient that is not
    c·m (the exact fallback).
    """
    kern = KERNELS[name](11)
    h, w, b, x0, z, alpha, dalpha = _case(kern, dtype)
    m = torch.ones_like(x0, dtype=torch.bool)
    m[1, 4:] = False
    if not recompute and mode != "general":
        _no_recompute(monkeypatch)

    def reduce(ell):
        if mode == "sum":
            return ell.sum()
        if mode == "weighted":
            return torch.where(m, ell, torch.zeros_like(ell)).sum() / 3
        return (ell * torch.linspace(0.5, 1.5, ell.numel(), dtype=dtype).reshape(ell.shape)).sum()

    def ref(h, w, b):
        return kern.nelbo(h @ w.T + b, x0, z, alpha, dalpha)

    def fused(h, w, b):
        rw = m if mode == "weighted" else None
        return fused_nelbo(
            h,
            w,
            kern,
            x0,
            z,
            alpha,
            dalpha,
            chunk_size=chunk,
            bias=b,
            row_weight=rw,
            recompute=recompute,
        )

    out_ref, g_ref = _grads(ref, reduce, h, w, b)
    out, g = _grads(fused, reduce, h, w, b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    for a, r in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(KERNELS))
def test_closed_form_stat_grads_match_autograd(name):
    """d_x, d_z, d_S of docs/math.md §7.1 against autograd through `nelbo_from_stats`."""
    kern = KERNELS[name](11)
    h, w, b, x0, z, alpha, dalpha = _case(kern, torch.float64, B=4, L=9)
    lg = (h @ w.T + b).flatten(0, 1)
    if kern.mask_id is not None:
        lg[:, kern.mask_id] = float("-inf")
    lp = torch.log_softmax(lg, -1)
    t = RowTargets(
        kern, x0.flatten(), z.flatten(), alpha.repeat_interleave(9), -dalpha.repeat_interleave(9)
    )
    lp_x = lp.gather(1, t.x0[:, None]).squeeze(1).requires_grad_()
    lp_z = lp.gather(1, t.z_t[:, None]).squeeze(1).requires_grad_()
    c = t.log_c()
    sp = (
        None if c is None else torch.nn.functional.softplus(lp + c[:, None]).sum(1).requires_grad_()
    )
    v_gbar = None if c is None else torch.nn.functional.softplus(c) - sp
    ell = kern.nelbo_from_stats(lp_x, lp_z, v_gbar, t.x0, t.z_t, t.alpha, t.w)
    leaves = [lp_x, lp_z] + ([sp] if sp is not None else [])
    auto = torch.autograd.grad(ell.sum(), leaves, allow_unused=True)
    d = stat_grads(t, lp_x.detach(), lp_z.detach())
    for got, want in zip((d.d_x, d.d_z, d.d_s), auto, strict=False):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fused_second_backward_and_no_grad_values():
    """retain_graph: a second backward (stored gradients consumed) recomputes, same result."""
    kern = MixedKernel(13, 12, 0.1)
    h, w, b, x0, z, alpha, dalpha = _case(kern, torch.float64)
    h.requires_grad_(True)
    out = fused_nelbo(h, w, kern, x0, z, alpha, dalpha, chunk_size=5)
    out.sum().backward(retain_graph=True)
    first = h.grad.clone()
    h.grad = None
    out.sum().backward()
    torch.testing.assert_close(h.grad, first, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        again = fused_nelbo(h, w, kern, x0, z, alpha, dalpha)
    torch.testing.assert_close(again, out.detach(), rtol=1e-12, atol=1e-12)


def test_chunk_probe_times_each_candidate_then_keeps_the_fastest():
    assert candidates(10_000, 126_464) == (32, 64, 128, 256)  # 2^25 logits cap: 265 rows
    assert candidates(1024, 30_522) == (32, 64, 128, 256)  # a quarter of the first call's rows
    assert candidates(100, 50) == (16,)
    probe = ChunkProbe((16, 32, 64))
    fake = {16: 3.0, 32: 1.0, 64: 2.0}  # seconds per row
    seen = []
    while probe.chosen is None:
        size = probe.next_size()
        seen.append(size)
        probe.record(size, size, fake[size] * size)
    assert sorted(seen) == [16, 16, 32, 32, 64, 64] and probe.chosen == 32
    probe.record(64, 64, 0.0)  # ignored once chosen
    assert probe.next_size() == 32


def test_fused_probe_chunks_give_the_same_loss():
    """chunk_size=None (probe, sizes vary between chunks) equals a fixed chunking."""
    kern = MixedKernel(40, 39, 0.1)
    h, w, b, x0, z, alpha, dalpha = _case(kern, torch.float64, B=4, L=50, D=6)
    out_ref, g_ref = _grads(
        lambda h, w: fused_nelbo(h, w, kern, x0, z, alpha, dalpha, chunk_size=7), torch.sum, h, w
    )
    for _ in range(3):  # the probe tries its candidates over these calls
        out, g = _grads(lambda h, w: fused_nelbo(h, w, kern, x0, z, alpha, dalpha), torch.sum, h, w)
        torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
        for a, r in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_fused_gradcheck_and_no_bias():
    kern = MixedKernel(7, 6, 0.3)
    h, w, _, x0, z, alpha, dalpha = _case(kern, torch.float64, B=2, L=3, D=3)
    for recompute in (False, True):

        def fn(h, w, recompute=recompute):
            ell = fused_nelbo(h, w, kern, x0, z, alpha, dalpha, chunk_size=2, recompute=recompute)
            return ell.sum()  # a scalar: the stored-gradient path

        # gradcheck reruns backward on one graph: the rerun takes the recompute path, which
        # rounds differently in the last bits (hence nondet_tol).
        inputs = (h.requires_grad_(), w.requires_grad_())
        assert torch.autograd.gradcheck(fn, inputs, nondet_tol=1e-12)


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_bf16_autocast_close_to_unfused(recompute):
    kern = MixedKernel(50, 49, 0.1)
    h, w, _, x0, z, alpha, dalpha = _case(kern, torch.float32, B=2, L=16, D=32)

    def fused(h, w):
        return fused_nelbo(h, w, kern, x0, z, alpha, dalpha, chunk_size=5, recompute=recompute)

    with torch.autocast("cpu", torch.bfloat16):
        out_ref, g_ref = _grads(
            lambda h, w: kern.nelbo(h @ w.T, x0, z, alpha, dalpha), _weighted, h, w
        )
        out, g = _grads(fused, _weighted, h, w)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g, g_ref, strict=True):
        assert a.dtype == r.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)


def test_fused_diffusion_loss_matches_diffusion_loss_on_dit(monkeypatch):
    """Padding mask as row weights: the training loss uses the stored gradients, exactly."""
    _no_recompute(monkeypatch)
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


@pytest.mark.slow
def test_fused_compiled_chunks_equal_eager():
    """compile_chunks=True (torch.compile of the per-chunk arithmetic) gives the same loss.

    Slow (a compile, about a minute on 2 cores): `pytest -m slow tests/test_core_fused.py`.
    """
    kern = MixedKernel(40, 39, 0.1)
    h, w, b, x0, z, alpha, dalpha = _case(kern, torch.float32, B=2, L=20, D=6)
    out_ref, g_ref = _grads(
        lambda h, w: fused_nelbo(h, w, kern, x0, z, alpha, dalpha, chunk_size=8), torch.sum, h, w
    )
    out, g = _grads(
        lambda h, w: fused_nelbo(
            h, w, kern, x0, z, alpha, dalpha, chunk_size=8, compile_chunks=True
        ),
        torch.sum,
        h,
        w,
    )
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
