"""Trackers (TensorBoard, W&B offline) fed by a real training run, and `xdlm plot`."""

import gzip
import json

import pytest

from xdlm.cli import main
from xdlm.config import load_config
from xdlm.data.corpora import embedded_corpus_path
from xdlm.train.curves import read_curves
from xdlm.train.loop import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "austen.txt"
    path.write_text(gzip.open(embedded_corpus_path(), "rt").read()[:60_000])
    return path


def _cfg(corpus, data_dir, *extra):
    return load_config(None, [
        f"data.path={data_dir}", f"data.sources=[{corpus}]", "data.tokenizer=char",
        "data.seq_len=32", "data.batch_size=4", "model.n_layers=1", "model.d_model=32",
        "model.n_heads=2", "train.steps=4", "train.warmup_steps=1", "train.log_every=1",
        "train.eval_every=2", "train.eval_batches=1", "train.save_every=4",
        "train.precision=fp32", *extra,
    ])  # fmt: skip


def _scalars(event_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tb_run(corpus, tmp_path_factory):
    """One 4-step run with TensorBoard on (validation at steps 2 and 4)."""
    pytest.importorskip("tensorboard")
    tmp = tmp_path_factory.mktemp("tb")
    train(_cfg(corpus, tmp / "data", "train.tensorboard=true"), tmp / "run")
    return tmp / "run"


def test_tensorboard_events_match_metrics_jsonl(tb_run):
    scalars = _scalars(tb_run / "tensorboard")
    records = [json.loads(x) for x in (tb_run / "metrics.jsonl").read_text().splitlines()]
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_nats_per_token"]) for r in records if "valid_ppl" in r]
    assert [s for s, _ in loss] == [1, 2, 3, 4] and [s for s, _ in valid] == [2, 4]
    for tag, expected in (("train/loss", loss), ("valid/nats_per_token", valid)):
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got, expected, strict=True))
    assert "train/lr" in scalars and "valid/ppl" in scalars


def test_wandb_offline(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(_cfg(corpus, tmp_path / "data", "train.wandb=true"), run)
    assert list((run / "wandb").glob("offline-run-*"))


def test_plot_writes_curves(tb_run, tmp_path, capsys):
    other = tmp_path / "mdlm"  # a second run, logged by hand
    other.mkdir()
    records = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.5, "valid_nats_per_token": 3.4}]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = read_curves(tb_run)
    assert curves.train_steps == [1, 2, 3, 4] and curves.valid_steps == [2, 4]
    assert read_curves(other).valid_nats == [3.4]
    out = tmp_path / "curves.png"
    assert main(["plot", str(tb_run), str(other), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_unknown_wandb_mode():
    with pytest.raises(ValueError, match="'train.wandb_mode' must be one of.*'sometimes'"):
        load_config(None, ["train.wandb=true", "train.wandb_mode=sometimes"])


class _Recorder:
    def __init__(self):
        self.logged = []

    def log(self, scalars, step):
        self.logged.append((step, scalars))


def _track_cfg(**flags):
    from types import SimpleNamespace

    return SimpleNamespace(**{"tensorboard": False, "wandb": False, "wandb_project": "p",
                              "wandb_mode": "offline", **flags})  # fmt: skip


def test_only_finite_numbers_are_tracked_under_train_or_valid(tmp_path, monkeypatch):
    from xdlm.train import trackers

    recorder, configs = _Recorder(), []

    def wandb(cfg, run_dir, config):
        configs.append(config)
        return recorder

    monkeypatch.setattr(trackers, "_wandb", wandb)
    t = trackers.Trackers(_track_cfg(wandb=True), tmp_path, {"a": 1})
    t.log({"step": 3, "loss": 1.5, "valid_nll": 2, "lr": float("nan"), "note": "x"})
    assert recorder.logged == [(3, {"train/loss": 1.5, "valid/nll": 2})]
    assert configs == [{"a": 1}] and list(tmp_path.iterdir()) == []  # no TensorBoard asked
    trackers.Trackers(_track_cfg(), tmp_path, {}).log({"step": 1, "loss": 1.0})  # none asked
    assert len(configs) == 1 and list(tmp_path.iterdir()) == []


def test_wandb_continues_the_run_of_its_directory(tmp_path, monkeypatch):
    """The W&B run id is derived from the run directory, so a resumed run continues it."""
    import hashlib
    import sys
    import types

    from xdlm.train import trackers

    calls = []
    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(kwargs))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "runs" / "r1"
    for _ in range(2):
        trackers._wandb(_track_cfg(wandb=True), run, {"a": 1})
    want = dict(
        project="p", name="r1", dir=str(run), config={"a": 1}, mode="offline", resume="allow",
        id=hashlib.sha1(str(run.resolve()).encode()).hexdigest()[:16],
    )  # fmt: skip
    assert calls == [want, want]


@pytest.mark.parametrize(
    ("flag", "module", "message"),
    [
        ("tensorboard", "torch.utils.tensorboard",
         "train.tensorboard=true needs the tensorboard package: pip install 'xdlm[track]'"),
        ("wandb", "wandb", "train.wandb=true needs wandb: pip install 'xdlm[track]'"),
    ],
)  # fmt: skip
def test_a_missing_tracker_package_is_one_line(tmp_path, monkeypatch, flag, module, message):
    import sys

    from xdlm.train import trackers

    monkeypatch.setitem(sys.modules, module, None)  # import fails: not installed
    with pytest.raises(ValueError) as err:
        trackers.Trackers(_track_cfg(**{flag: True}), tmp_path, {})
    assert str(err.value) == message


def _metrics(run, *records):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_read_curves_keeps_zero_losses_and_skips_missing_ones(tmp_path, monkeypatch):
    from xdlm.train.curves import Curves

    run = _metrics(tmp_path / "r", {"step": 1, "loss": None}, {"step": 2, "loss": 0.0},
                   {"step": 2, "valid_nats_per_token": 1.5}, {"step": 3, "event": "x"})  # fmt: skip
    assert read_curves(run) == Curves("r", [2], [0.0], [2], [1.5])
    monkeypatch.chdir(run)
    assert read_curves(".").name == "."
    with pytest.raises(FileNotFoundError) as err:
        read_curves(tmp_path / "none")
    assert str(err.value) == (
        f"{tmp_path / 'none' / 'metrics.jsonl'} does not exist; pass a run directory of "
        "`xdlm train`"
    )


def test_plot_refuses_a_directory_a_non_image_name_and_empty_runs(tmp_path):
    from xdlm.train.curves import plot_runs

    run = _metrics(tmp_path / "r", {"step": 1, "loss": 2.0})
    for out, what, example in (
        (tmp_path, "a directory", tmp_path / "curves.png"),
        (tmp_path / "c.txt", "not an image file name", tmp_path / "c.png"),
    ):
        with pytest.raises(ValueError) as err:
            plot_runs([run], out)
        text = str(err.value)
        assert text.startswith(f"--out {out} is {what}; pass a file ending in one of ")
        assert text.endswith(f", e.g. {example}") and ".png, " in text and ".svg" in text
    empty = _metrics(tmp_path / "e", {"step": 1, "event": "start"})
    with pytest.raises(ValueError) as err:
        plot_runs([empty], tmp_path / "c.png")
    assert str(err.value) == f"no loss or validation record in {[str(empty)]}"
    out = plot_runs([run], tmp_path / "new" / "dir" / "c.PNG")  # parents made, any case
    png = out.read_bytes()
    assert png[:4] == b"\x89PNG"
    size = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert size == (11 * 120, 4 * 120)  # 11 x 4 inches at 120 dpi


def test_the_figure_draws_each_run_against_its_steps(tmp_path):
    """What the PNG shows: per run, the training loss at its logged steps (not their indices)
    on the left and the validation NELBO with markers on the right, titled and labelled, one
    legend entry per run; a run that logged no validation adds an empty series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xdlm.train.curves import curves_figure, read_curves

    a = _metrics(tmp_path / "mdlm", {"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.5},
                 {"step": 20, "valid_nats_per_token": 2.75}, {"step": 30, "loss": None},
                 {"step": 40, "valid_nats_per_token": 2.5})  # fmt: skip
    b = _metrics(tmp_path / "xdlm", {"step": 5, "loss": 4.0})
    fig = curves_figure([read_curves(a), read_curves(b)])
    try:
        left, right = fig.axes
        assert [ax.get_title() for ax in (left, right)] == [
            "training loss", "validation NELBO (EMA)"]  # fmt: skip
        for ax in (left, right):
            assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "nats / token")
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mdlm", "xdlm"]
            assert all(line.get_visible() for line in ax.get_xgridlines())
        (la, lb), (va, vb) = left.get_lines(), right.get_lines()
        assert (list(la.get_xdata()), list(la.get_ydata())) == ([10, 20], [3.0, 2.5])
        assert (list(lb.get_xdata()), list(lb.get_ydata())) == ([5], [4.0])
        assert (list(va.get_xdata()), list(va.get_ydata())) == ([20, 40], [2.75, 2.5])
        assert list(vb.get_xdata()) == [] and va.get_marker() == "o"
        assert la.get_marker() in ("None", None, "")
        assert tuple(fig.get_size_inches()) == (11.0, 4.0)
        assert left.get_position().x1 < right.get_position().x0  # side by side, loss left
    finally:
        plt.close(fig)
