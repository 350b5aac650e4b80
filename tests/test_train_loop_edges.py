"""Edges of `xdlm.train.loop.Trainer` that its cadence tests leave open (issue 29): the global
batch limit on 2 ranks, the loader built from the run's seed, rank and world size, a dataset
with no validation split, the EMA's configured decay, `train.compile` wrapping the model,
tokens/s from the loop's own clock, one save per interrupted step, and the bar of a resume."""

import hashlib
import signal
from types import SimpleNamespace

import pytest
import torch
from run_fixtures import TINY_TOKENS as TOKENS
from run_fixtures import tiny_cfg

from xdlm.data.loader import ShardedLoader, TokenShards
from xdlm.train import loop
from xdlm.train.loop import Trainer, stream_seed


def test_the_global_batch_limit_counts_both_ranks(make_trainer, tiny_run, rank_0_of_2):
    """Rank 0 of 2 needs B·2 train rows: the largest B that fits is n // 2, one more is refused."""
    n = len(TokenShards(tiny_run / "data", "train"))
    assert make_trainer(f"data.batch_size={n // 2}", run="fits").loader is not None
    with pytest.raises(ValueError, match=rf"has {n} training rows, fewer than one global batch "
                       rf"\({n // 2 + 1}×2\)"):  # fmt: skip
        make_trainer(f"data.batch_size={n // 2 + 1}", run="past")


def _first_rows(loader: ShardedLoader) -> torch.Tensor:
    return torch.as_tensor(next(iter(loader)).tokens)


def test_the_loader_follows_the_runs_seed_rank_and_world_size(make_trainer, tiny_run, rank_0_of_2):
    """Rank 0 of 2 with train.seed=3 draws exactly the rows of ShardedLoader(seed=3, rank=0,
    world_size=2), not those of another seed or of a single process."""
    shards = TokenShards(tiny_run / "data", "train")
    got = _first_rows(make_trainer("train.seed=3").loader)
    same = _first_rows(ShardedLoader(shards, 8, seed=3, rank=0, world_size=2))
    assert torch.equal(got, same)
    assert not torch.equal(got, _first_rows(ShardedLoader(shards, 8, seed=0, rank=0, world_size=2)))
    assert not torch.equal(got, _first_rows(ShardedLoader(shards, 8, seed=3, rank=0, world_size=1)))


def test_a_dataset_without_a_valid_split_trains_without_validation(tiny_corpus, tmp_path, capsys):
    cfg = tiny_cfg(tiny_corpus, tmp_path / "data", "data.valid_fraction=0", "train.steps=2")
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        assert "valid" not in trainer.manifest.splits and trainer.valid is None
        result = trainer.run()
    finally:
        trainer.close()
    assert (result.step, result.valid) == (2, None)
    assert "valid NELBO" not in capsys.readouterr().out


def test_the_ema_averages_with_the_configured_decay(make_trainer):
    """train.ema_decay=0.05 (below the warm-up's 1/10 at the first update): after one step the
    shadow is 0.05·w_0 + 0.95·w_1 exactly as configured."""
    tr = make_trainer("train.ema_decay=0.05", "train.steps=1", "train.eval_batches=0")
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.run()
    for name, p in tr.model.named_parameters():
        expected = 0.05 * before[name] + 0.95 * p.detach()
        torch.testing.assert_close(tr.ema.shadow[name], expected)


def test_compile_wraps_the_model_it_trains(make_trainer, monkeypatch):
    """train.compile=true trains through `torch.compile(model)` (recorded here, not compiled:
    the CPU compile is slow), while the EMA and checkpoints keep the plain model."""
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return SimpleNamespace(wraps=module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    tr = make_trainer("train.compile=true")
    assert compiled == [tr.model] and tr.wrapped.wraps is tr.model


def test_tokens_per_s_is_measured_on_the_loops_clock(make_trainer, monkeypatch):
    """tokens/s = tokens of this run / seconds since it started, on loop's perf_counter (a fake
    clock here: 0.01 s per reading, from 1000 s, so the run lasts well under a second)."""
    readings = []

    def clock():
        readings.append(1000.0 + 0.01 * len(readings))
        return readings[-1]

    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=clock))
    result = make_trainer("train.steps=2", "train.eval_batches=0").run()
    seconds = readings[-1] - readings[0]
    assert seconds < 1.0
    assert result.tokens_per_s == pytest.approx(2 * TOKENS / seconds)


def test_an_interrupt_at_a_save_step_saves_it_once(make_trainer, monkeypatch):
    """Ctrl-C during step 2 (a save step of save_every=2): the cadence saves step 2 and the
    interrupt reuses that checkpoint instead of writing it again."""
    tr = make_trainer("train.eval_batches=0")
    saves, real_save, real_step = [], tr.save, tr.train_step

    def step():
        loss = real_step()
        if tr.state.step == 2:
            signal.raise_signal(signal.SIGINT)
        return loss

    def save():
        saves.append(tr.state.step)
        return real_save()

    monkeypatch.setattr(tr, "train_step", step)
    monkeypatch.setattr(tr, "save", save)
    result = tr.run()
    assert (result.interrupted, result.step, saves) == (True, 2, [2])


def test_a_resumed_bar_counts_from_the_resumed_step(make_trainer, capsys):
    first = make_trainer("train.steps=2", "train.eval_batches=0")
    first.run()
    first.close()
    capsys.readouterr()
    make_trainer("train.steps=4", "train.eval_batches=0", resume=True).run()
    err = capsys.readouterr().err
    assert "2/4" in err and "4/4" in err and "0/4" not in err


def test_the_kernel_spans_every_logit_of_a_wider_backbone(make_trainer, tmp_path):
    """An HF backbone with 320 output rows on data of a smaller vocabulary: the kernel's V is the
    model's (uniform noise over every id it can output), not the data's."""
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_config
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "hf")
    tr = make_trainer("model.backbone=hf", f"model.hf_name={tmp_path / 'hf'}")
    assert tr.manifest.vocab_size < 320
    assert (
        tr.kernel.vocab_size
        == 320
        == tr.model(torch.zeros(1, 32, dtype=torch.long), torch.ones(1)).shape[-1]
    )


def test_validation_reads_the_valid_split(make_trainer, tiny_run):
    tr = make_trainer()
    assert tr.valid.split == "valid"
    assert len(tr.valid) == len(TokenShards(tiny_run / "data", "valid")) != len(tr.loader.shards)


def test_the_random_streams_are_distinct_and_follow_seed_and_rank(make_trainer):
    """Noise (per rank), times (every rank alike) and dropout (per rank) each get their own seed
    from (train.seed, stream): at seed 0 on rank 0 no two of them, nor the initial weights'
    seed 0, coincide (they did with seed·7919 + rank: noise and times both drew from seed 0)."""
    tr = make_trainer("train.seed=0")
    seeds = (tr.noise_gen.initial_seed(), tr.time_gen.initial_seed(), torch.initial_seed())
    assert seeds == (stream_seed(0, "noise/0"), stream_seed(0, "time"), stream_seed(0, "dropout/0"))
    assert len({*seeds, 0, stream_seed(0, "noise/1"), stream_seed(0, "dropout/1")}) == 6
    assert stream_seed(3, "time") != stream_seed(0, "time")
    assert all(0 <= s < 2**63 for s in seeds)
    blake = hashlib.blake2b(b"0:time", digest_size=8).digest()  # the top 63 of its 64 bits
    assert stream_seed(0, "time") == int.from_bytes(blake, "big") >> 1


def test_the_trackers_get_the_whole_config(make_trainer, monkeypatch):
    got = []

    class Recorder:
        def __init__(self, cfg, run_dir, config):
            got.append(config)

        def log(self, record):
            pass

        def close(self):
            pass

    monkeypatch.setattr(loop, "Trackers", Recorder)
    tr = make_trainer("train.seed=3")
    assert got == [tr.cfg.to_dict()] and got[0]["train"]["seed"] == 3
