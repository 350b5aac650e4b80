"""Time sampling, corruption and the loss wrappers against their definitions (issue 20: tests
written to kill surviving mutants of core/objective.py and core/fused.py)."""

import pytest
import torch

from xdlm import MixedKernel, make_schedule
from xdlm.core.fused import fused_diffusion_loss
from xdlm.core.objective import diffusion_loss, sample_times
from xdlm.models.dit import DiT, DiTConfig

SCHED = make_schedule("loglinear")


@pytest.mark.parametrize("world_size", [1, 3])
def test_antithetic_times_are_one_per_stratum_of_the_global_batch(world_size):
    """t_i = t_min + (1 − t_min)·((u + i/N) mod 1), N = B·W: exactly one t per stratum."""
    B, t_min = 4, 0.1
    ranks = [
        sample_times(B, torch.Generator().manual_seed(3), t_min=t_min, rank=r,
                     world_size=world_size)
        for r in range(world_size)
    ]  # fmt: skip
    t = torch.cat(ranks)
    unit = (t - t_min) / (1 - t_min)
    assert bool(((t >= t_min) & (t < 1)).all())
    strata = (unit * B * world_size).floor().sort().values
    torch.testing.assert_close(strata, torch.arange(float(B * world_size)))
    gaps = torch.remainder(unit - unit[0], 1.0) * B * world_size  # u + i/N: gaps are integers
    torch.testing.assert_close(gaps, gaps.round(), atol=1e-4, rtol=0)


def test_independent_times_cover_the_interval_and_follow_the_generator():
    t = sample_times(4000, torch.Generator().manual_seed(0), t_min=0.2, antithetic=False)
    again = sample_times(4000, torch.Generator().manual_seed(0), t_min=0.2, antithetic=False)
    assert t.shape == (4000,) and torch.equal(t, again)
    assert float(t.min()) >= 0.2 and float(t.max()) < 1.0
    assert abs(float(t.mean()) - 0.6) < 0.01  # U[0.2, 1): mean 0.6, SE 0.0037
    r1 = sample_times(4, torch.Generator().manual_seed(0), antithetic=False, rank=1,
                      world_size=2)  # fmt: skip
    full = sample_times(4, torch.Generator().manual_seed(0), antithetic=False, world_size=2)
    assert not torch.equal(r1, full)  # rank 1 takes the second row of the (W, B) draw
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="t_min must be in"):
            sample_times(2, t_min=bad)


class Spy(torch.nn.Module):
    """Records what the loss passes in; logits depend on z only."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))
        self.seen = {}

    def forward(self, z, t, attention_mask=None, cond=None):
        self.seen = {"z": z, "t": t, "cond": cond, "mask": attention_mask}
        return self.table[z]


def test_diffusion_loss_passes_t_and_cond_and_keeps_kept_tokens_clean():
    V = 8
    kern, x0 = MixedKernel(V, V - 1, 0.5), torch.randint(V - 1, (3, 10))
    keep = torch.zeros(3, 10, dtype=torch.bool)
    keep[:, :4] = True  # an SFT prompt: never noised, never scored
    spy, cond = Spy(V), torch.tensor([0, 2, 1])
    out = diffusion_loss(spy, kern, SCHED, x0, cond=cond, keep_mask=keep, loss_mask=~keep,
                         generator=torch.Generator().manual_seed(0), t_min=0.5)  # fmt: skip
    assert torch.equal(spy.seen["t"], out.t) and torch.equal(spy.seen["cond"], cond)
    assert bool((out.t >= 0.5).all()) and torch.equal(spy.seen["z"], out.z_t)
    assert torch.equal(out.z_t[keep], x0[keep]) and bool((out.z_t[~keep] != x0[~keep]).any())
    assert bool((out.per_token[keep] == 0).all()) and out.tokens == 18


def test_fused_loss_passes_the_class_label():
    """Class-conditional DiT: the fused loss equals the unfused one with the same labels."""
    V = 11
    model = DiT(DiTConfig(vocab_size=V, n_layers=1, d_model=16, n_heads=2, max_seq_len=16,
                          num_classes=3))  # fmt: skip
    x0, cond = torch.randint(V - 1, (3, 7)), torch.tensor([0, 1, 2])
    kern = MixedKernel(V, V - 1, 0.1)
    out = [
        fn(model, kern, SCHED, x0, cond=c, generator=torch.Generator().manual_seed(1)).nats
        for fn in (diffusion_loss, fused_diffusion_loss)
        for c in (cond, None)
    ]
    torch.testing.assert_close(out[2], out[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3], out[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[1])  # the label reaches the logits
