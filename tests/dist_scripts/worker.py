"""Worker for tests/test_distributed.py, launched as
`torchrun --nproc_per_node 2 tests/dist_scripts/worker.py MODE OUT_JSON`.

Modes:
  step-ddp / step-fsdp  one optimizer step (2 accumulated micro-batches per rank, gradient
                        clipping, AdamW) of a float64 DiT on 2 ranks vs one process on the
                        concatenated batch; writes the max parameter difference.
  step-fsdp-hf          the same with a tiny float64 Llama `HFDenoiser` (tests/hf_fixtures.py).
  eval                  likelihood NELBO split across ranks (`evaluate_rows_distributed`) vs one
                        process, and `gather_samples`; writes both results.
  kill                  rank 1 is SIGKILLed after two all-reduces (torchrun must fail the job).
  hang                  rank 1 stops answering (sleeps): rank 0's collective must time out.
  trainer DATA_DIR      a real `Trainer` (ddp) on DATA_DIR on each rank; each rank writes
                        OUT_JSON.rank<r>: its first batch's rows and its random streams' seeds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from xdlm.config import DistConfig
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import make_schedule
from xdlm.eval.distributed import evaluate_rows_distributed, gather_samples
from xdlm.models.dit import DiT, DiTConfig
from xdlm.train import distributed as D

V, L, B = 17, 12, 4  # vocab, length, per-rank micro-batch


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    cfg = DiTConfig.from_preset(
        "tiny", V, n_layers=2, d_model=32, n_heads=2, time_conditioning=True
    )
    return DiT(cfg)


def tiny_hf() -> torch.nn.Module:
    sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for hf_fixtures
    from hf_fixtures import tiny_config

    from xdlm.models.hf import HFDenoiser

    torch.manual_seed(0)
    return HFDenoiser.from_config(tiny_config("llama", vocab_size=V), kind="decoder")


def data(world: int, accum: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0, z_t (accum, world*B, L) and t (accum, world*B): the global batches of the step."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, V - 1, (accum, world * B, L), generator=g)
    noise = torch.rand(x0.shape, generator=g) < 0.5
    z = torch.where(noise, torch.full_like(x0, V - 1), x0)
    t = torch.rand((accum, world * B), generator=g, dtype=torch.float64)
    return x0, z, t


def one_step(model, wrapped, x0, z, t, total: float, world: int) -> None:
    """Σ-reduced cross entropy over the given micro-batches / global token count, then a step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for a in range(x0.shape[0]):
        with D.no_sync(wrapped, a < x0.shape[0] - 1):
            logits = wrapped(z[a], t[a])
            nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0[a], reduction="sum")
            (nats * (world / total)).backward()
    D.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def step_mode(strategy: str, ctx: D.DistContext, build=tiny_dit) -> dict:
    accum = 2
    x0, z, t = data(ctx.world_size, accum)
    total = float(x0[0].numel() * accum)
    ref = build()
    one_step(ref, ref, x0, z, t, total, 1)
    model = build()
    wrapped = D.wrap_model(model, DistConfig(strategy=strategy, activation_checkpointing=True), ctx)
    rows = slice(ctx.rank * B, (ctx.rank + 1) * B)
    one_step(model, wrapped, x0[:, rows], z[:, rows], t[:, rows], total, ctx.world_size)
    ref_params = dict(ref.named_parameters())
    diff = max(float((full(p) - ref_params[n]).abs().max()) for n, p in model.named_parameters())
    moved = max(float((full(p) - q).abs().max()) for (n, p), q in zip(
        model.named_parameters(), build().parameters(), strict=True))  # fmt: skip
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    blocks_sharded = all(D.is_sharded(b) for b in model.blocks)
    return {"max_diff": diff, "moved": moved, "sharded": D.is_sharded(model),
            "blocks_sharded": blocks_sharded, "dtypes": dtypes}  # fmt: skip


def eval_mode(ctx: D.DistContext) -> dict:
    from xdlm.eval.likelihood import evaluate_rows

    model = tiny_dit().eval()
    kernel, schedule = MixedKernel(V, V - 1, 0.1), make_schedule("loglinear")
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, V - 1, (13, L), generator=g)

    def batches():
        for s in range(0, 13, 3):
            ids = torch.arange(s, min(s + 3, 13))
            yield ids, type("R", (), {"tokens": rows[ids], "attention_mask": None})()

    one = evaluate_rows(model, kernel, schedule, batches(), t_samples=2)
    dist = evaluate_rows_distributed(model, kernel, schedule, batches(), ctx, t_samples=2)

    def gen(n: int) -> torch.Tensor:
        return torch.full((n, 3), ctx.rank)

    samples = gather_samples(gen, 5, ctx)
    return {"one": one.to_dict(), "dist": dist.to_dict(), "samples": samples.tolist()}


def fail_mode(mode: str, ctx: D.DistContext) -> dict:
    x = torch.ones(())
    for i in range(1000):
        if ctx.rank == 1 and i == 2:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        D.all_reduce_sum(x, ctx)
    return {}


def trainer_mode(out: str, data_dir: str) -> None:
    """Each rank's first rows and stream seeds, from the real loop's `Trainer` (rank 0 holds the
    run's lock; rank 1 must not take it)."""
    from xdlm.config import load_config
    from xdlm.train.loop import Trainer

    sets = [f"data.path={data_dir}", "data.seq_len=32", "data.batch_size=8",
            "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "train.device=cpu",
            "dist.strategy=ddp", "train.seed=5"]  # fmt: skip
    trainer = Trainer(load_config(None, sets), Path(out).parent / "run")
    try:
        rows = next(iter(trainer.loader)).tokens.tolist()
        seeds = [trainer.noise_gen.initial_seed(), trainer.time_gen.initial_seed(),
                 torch.initial_seed()]  # fmt: skip
        with open(f"{out}.rank{trainer.ctx.rank}", "w") as fh:
            json.dump({"rows": rows, "seeds": seeds, "lock": trainer.lock is not None}, fh)
    finally:
        trainer.close()
        D.cleanup(trainer.ctx)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "trainer":
        return trainer_mode(out, sys.argv[3])
    strategy = mode.split("-")[1] if mode.startswith("step-") else "ddp"
    ctx = D.setup_distributed(DistConfig(strategy=strategy), "cpu")
    if mode.startswith("step-"):
        torch.set_default_dtype(torch.float64)
        result = step_mode(strategy, ctx, tiny_hf if mode.endswith("-hf") else tiny_dit)
    elif mode == "eval":
        result = eval_mode(ctx)
    else:
        result = fail_mode(mode, ctx)
    if ctx.is_main:
        with open(out, "w") as fh:
            json.dump(result, fh)
    D.cleanup(ctx)


if __name__ == "__main__":
    main()
