"""Distributed training (torchrun, gloo, 2 CPU processes): 2-process == 1-process.

    python -m pytest -m distributed tests/test_distributed.py      # about 2 minutes on 2 cores

Step equality (DDP and FSDP2 with activation checkpointing, accumulation and clipping, float64),
likelihood / sample gathering, matching loss curves, exact resume, consolidation, and a dead or
hung rank failing the job quickly.
"""

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xdlm.core.objective import sample_times
from xdlm.data.corpora import embedded_corpus_path
from xdlm.runs import load_run

WORKER = Path(__file__).parent / "dist_scripts" / "worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "XDLM_DIST_TIMEOUT_S": "10"}


def torchrun(*args, nproc=2, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc)]
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def worker(mode, tmp_path):
    out = tmp_path / f"{mode}.json"
    proc = torchrun(WORKER, mode, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_stratified_times_cover_the_global_batch():
    """The (micro-batch a, rank r) blocks of t are one process's times on the global batch."""
    u, B, accum, world = torch.tensor(0.37), 3, 2, 2
    parts = [
        sample_times(B, u=u, rank=a * world + r, world_size=accum * world)
        for a in range(accum)
        for r in range(world)
    ]
    whole = sample_times(B * accum * world, u=u)
    assert torch.allclose(torch.cat(parts), whole)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_step_equals_one_process_on_the_concatenated_batch(strategy, tmp_path):
    result = worker(f"step-{strategy}", tmp_path)
    assert result["sharded"] == (strategy == "fsdp")
    assert result["moved"] > 1e-3  # the step did something
    assert result["max_diff"] < 1e-12


@pytest.mark.distributed
def test_likelihood_and_samples_split_across_ranks(tmp_path):
    result = worker("eval", tmp_path)
    one, dist = result["one"], result["dist"]
    assert dist["sequences"] == one["sequences"] == 13 and dist["tokens"] == one["tokens"]
    for key in ("nats_per_token", "se_nats_per_token"):
        assert dist[key] == pytest.approx(one[key], rel=1e-9)
    assert result["samples"] == [[0] * 3] * 3 + [[1] * 3] * 2  # 5 split 3 + 2, rank order


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_a_dead_or_hung_rank_fails_the_job_quickly(mode, tmp_path):
    start = time.monotonic()
    proc = torchrun(WORKER, mode, tmp_path / "x.json", timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    expected = "SIGKILL" if mode == "kill" else "Timed out"
    assert expected in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs of `xdlm train` on a char-level Austen excerpt: 2-rank DDP and FSDP (straight and
    3 steps + resume), and 1 rank with the same global batch."""
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "austen.txt"
    corpus.write_text(gzip.open(embedded_corpus_path(), "rt").read()[:60_000])
    sets = [
        f"data.path={root / 'data'}", f"data.sources=[{corpus}]", "data.tokenizer=char",
        "data.seq_len=32", "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
        "train.steps=6", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=3",
        "train.eval_batches=2", "train.save_every=3", "train.lr=3e-3", "train.ema_decay=0.9",
        "train.device=cpu",
    ]  # fmt: skip

    def train(out, nproc, *extra, resume=False):
        args = ["-m", "xdlm", "train", "--out", root / out, "--no-samples"]
        args += ["--resume"] if resume else []
        for s in [*sets, *extra]:
            args += ["--set", s]
        proc = torchrun(*args, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    train("one", 1, "data.batch_size=16")  # prepares the data first
    for s in ("ddp", "fsdp"):
        log = train(s, 2, "data.batch_size=8", f"dist.strategy={s}")
        train(f"{s}-resumed", 2, "data.batch_size=8", f"dist.strategy={s}", "train.steps=3")
        train(f"{s}-resumed", 2, "data.batch_size=8", f"dist.strategy={s}", resume=True)
    runs = {p.name: p for p in root.iterdir() if p.is_dir()}
    return runs, log.stdout + log.stderr


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.distributed
def test_two_ranks_match_one_rank_with_the_same_global_batch(runs):
    runs, log = runs
    assert "global batch 16 sequences = micro 8 x accum 1 x world 2" in log
    one, ddp, fsdp = (losses(runs[n]) for n in ("one", "ddp", "fsdp"))
    assert len(one) == len(ddp) == 6
    assert ddp == pytest.approx(fsdp, rel=1e-5)  # same data and noise: same numbers
    # Same rows and t per step, but z_t comes from per-rank noise generators, so the draws
    # differ from one process's (the NELBO of one 16-row batch spreads by ~0.4 nats over noise
    # draws); exact 2 == 1 equality on identical inputs is the float64 step test above.
    assert sum(abs(a - b) for a, b in zip(ddp, one, strict=True)) / 6 < 0.4
    assert ddp[-1] < ddp[0] - 0.3 and one[-1] < one[0] - 0.3


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_on_two_ranks_continues_exactly(runs, strategy):
    runs, _ = runs
    assert losses(runs[f"{strategy}-resumed"]) == losses(runs[strategy])


@pytest.mark.distributed
def test_consolidated_fsdp_checkpoint_loads_like_a_ddp_one(runs, tmp_path):
    runs, _ = runs
    with pytest.raises(ValueError, match="xdlm consolidate"):
        load_run(runs["fsdp"])
    proc = subprocess.run(
        [sys.executable, "-m", "xdlm", "consolidate", runs["fsdp"], "--out", tmp_path / "c"],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for use_ema in (True, False):
        a = load_run(tmp_path / "c", use_ema=use_ema)
        b = load_run(runs["ddp"], use_ema=use_ema)
        assert a.step == b.step == 6 and a.tokenizer is not None
        sb = b.model.state_dict()
        for name, value in a.model.state_dict().items():
            torch.testing.assert_close(value, sb[name], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_each_rank_reads_its_own_rows_and_noise_stream(runs, tmp_path):
    """The real `Trainer` on 2 ranks: the ranks' first rows are disjoint halves of one process's
    global batch; noise and dropout seeds differ by rank, the time seed is shared; only rank 0
    holds the run's lock."""
    from xdlm.data.loader import ShardedLoader, TokenShards
    from xdlm.train.loop import stream_seed

    data = runs[0]["data"]
    out = tmp_path / "trainer.json"
    proc = torchrun(WORKER, "trainer", out, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    mine = [{tuple(row) for row in r["rows"]} for r in ranks]
    assert len(mine[0]) == len(mine[1]) == 8 and not mine[0] & mine[1]
    one = next(iter(ShardedLoader(TokenShards(data, "train"), 16, seed=5))).tokens.tolist()
    assert mine[0] | mine[1] == {tuple(row) for row in one}
    for r, got in enumerate(ranks):
        streams = (f"noise/{r}", "time", f"dropout/{r}")
        assert got["seeds"] == [stream_seed(5, s) for s in streams]
        assert got["lock"] == (r == 0)
