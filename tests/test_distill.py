"""Few-step distillation (`xdlm distill`): the two-half-step target is a distribution for any k,
the student's steps follow the grids, a tiny distillation runs from the CLI and a stopped one
resumes exactly; bad rounds / teachers are one-line user errors."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch

import xdlm.train.distill as distill_mod
from xdlm.builders import build_model
from xdlm.cli import main
from xdlm.config import ModelConfig
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import LogLinear
from xdlm.runs import load_run
from xdlm.sampling.distill import distillation_loss, student_steps, two_step_target
from xdlm.sampling.steps import UniformT
from xdlm.train.distill import distill

V, MASK = 9, 8


@pytest.mark.parametrize("k", [0.0, 0.1])
def test_two_step_target_is_a_distribution(k):
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2), V).eval()
    kernel, schedule = MixedKernel(V, MASK, k), LogLinear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(MASK, (6, 12), generator=g)
    times = student_steps(schedule, 2, torch.tensor([0.99, 0.9, 0.7, 0.5, 0.3, 0.01]))
    z_t = kernel.sample_marginal(x0, schedule.alpha(times.t), g)
    target = two_step_target(teacher, kernel, schedule, z_t, times, g)
    assert target.shape == (6, 12, V) and (target >= 0).all()
    torch.testing.assert_close(target.sum(-1), torch.ones(6, 12), rtol=0, atol=1e-5)
    assert (target[..., MASK] == 0).all()
    if k == 0.0:  # visible tokens of z_t stay visible in z_u and are their own one-hot target
        visible = z_t != MASK
        assert (target[visible].max(-1).values == 1).all()
        assert (target[visible].argmax(-1) == z_t[visible]).all()


def test_student_steps_split_the_teacher_grid():
    schedule = LogLinear()
    grid = UniformT().times(schedule, 8)  # the teacher's 2T = 8 steps for T = 4
    st = student_steps(schedule, 4, torch.tensor([1.0, 0.75001, 0.75, 0.001]))
    assert st.t.tolist() == [grid[0], grid[0], grid[2], grid[6]]
    assert st.u.tolist() == [grid[1], grid[1], grid[3], grid[7]]
    assert st.s.tolist() == [grid[2], grid[2], grid[4], grid[8]]
    one = student_steps(schedule, 1, torch.tensor([0.5]))
    assert (one.t.item(), one.s.item()) == (1.0, UniformT().t_end)


class _Constant:
    """The same logits (L, V) at every call, whatever z_t and t: teacher and student at once."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, z, t, attention_mask=None, cond=None):
        return self.logits.expand(z.shape[0], -1, -1)


@pytest.mark.parametrize("k", [0.0, 0.5])
def test_the_distillation_loss_is_the_cross_entropy_on_the_counted_positions(k):
    """With teacher = student = one fixed p_θ per position, CE(target, p_S) is the entropy H(p_l)
    where the target is p_T (every position at k > 0; where z_u is still masked at k = 0) and
    −log p_l(z_u) where k = 0's visible z_u is its own one-hot target. Counted: every real
    position at k > 0, the masked ones of z_t at k = 0; padding never."""
    kernel, schedule, (b, length) = MixedKernel(V, MASK, k), LogLinear(), (6, 16)
    logits = torch.randn(length, V, generator=torch.Generator().manual_seed(1))
    logits[:, MASK] = 10.0  # never drawn: p_T and p_S drop the mask's logit
    log_p = kernel.log_probs(logits)  # (L, V), −inf at the mask
    p = log_p.exp()
    entropy = -(p * log_p.clamp_min(-1e30)).sum(-1)  # H(p_l), (L,)
    model = _Constant(logits)
    x0 = torch.randint(MASK, (b, length), generator=torch.Generator().manual_seed(2))
    real = torch.ones(b, length, dtype=torch.bool)
    real[0, -5:] = False  # a padded row
    t = torch.tensor([0.999, 0.9, 0.7, 0.55, 0.4, 0.05])
    out = distillation_loss(model, kernel, schedule, x0, teacher=model, steps=2, t=t,
                            generator=torch.Generator().manual_seed(3),
                            attention_mask=real)  # fmt: skip
    assert torch.equal(out.t, student_steps(schedule, 2, t).t)
    counted = real & ((out.z_t == MASK) if k == 0.0 else torch.ones_like(real))
    assert int(out.tokens) == int(counted.sum()) and bool((out.per_token[~counted] == 0).all())
    assert torch.isfinite(out.per_token).all()  # 0·log 0 at the mask column is 0, not NaN
    torch.testing.assert_close(out.nats, out.per_token.sum())
    got, h = out.per_token[counted], entropy.expand(b, -1)[counted]
    if k > 0.0:
        torch.testing.assert_close(got, h)
        return
    one_hot_ce = -log_p.expand(b, -1, -1)[counted]  # (N, V): −log p_l(v) for every v
    is_entropy = (got - h).abs() < 1e-5
    is_one_hot = ((got.unsqueeze(-1) - one_hot_ce).abs() < 1e-5).any(-1)
    assert bool((is_entropy | is_one_hot).all())
    assert bool(is_entropy.any()) and bool((~is_entropy).any())  # both kinds of target occur


class _Recording(_Constant):
    """`_Constant` that records each call's (t, attention_mask, cond)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__(logits)
        self.calls = []

    def __call__(self, z, t, attention_mask=None, cond=None):
        self.calls.append((t, attention_mask, cond))
        return super().__call__(z, t)


def test_the_loss_hands_times_masks_and_labels_to_both_models_and_draws_from_its_generator():
    """k = 0: the target depends on the half-step's draws (one-hot where z_u is revealed)."""
    kernel, schedule = MixedKernel(V, MASK, 0.0), LogLinear()
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(0))
    x0 = torch.randint(MASK, (3, 16), generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([0.9, 0.6, 0.2]), torch.tensor([0, 2, 1])
    real = torch.ones(3, 16, dtype=torch.bool)

    def run(seed):
        torch.rand(3)  # moves the global RNG between runs
        teacher, student = _Recording(logits), _Recording(logits)
        out = distillation_loss(student, kernel, schedule, x0, teacher=teacher, steps=2, t=t,
                                generator=torch.Generator().manual_seed(seed),
                                attention_mask=real, cond=labels)  # fmt: skip
        return out, teacher.calls, student.calls

    out, teacher_calls, student_calls = run(0)
    times = student_steps(schedule, 2, t)
    want = [times.t.float(), times.u.float()]
    assert len(teacher_calls) == 2 and len(student_calls) == 1
    for (got_t, mask, cond), t_want in zip(teacher_calls + student_calls, want + want[:1],
                                          strict=True):  # fmt: skip
        assert torch.equal(got_t, t_want) and mask is real and cond is labels
    again, _, _ = run(0)
    assert torch.equal(out.z_t, again.z_t) and torch.equal(out.per_token, again.per_token)
    other, _, _ = run(1)
    assert not torch.equal(out.z_t, other.z_t)


def test_a_fully_visible_row_at_k0_is_its_own_one_hot_target_and_t_zero_is_the_last_step():
    kernel, schedule = MixedKernel(V, MASK, 0.0), LogLinear()
    z_t = torch.tensor([[0, 3, 1, 2]])  # no mask; token V − 2 absent as well
    times = student_steps(schedule, 4, torch.tensor([0.0]))  # t = 0 belongs to the last step
    grid = UniformT().times(schedule, 8)
    assert (times.t.item(), times.u.item(), times.s.item()) == (grid[6], grid[7], grid[8])
    target = two_step_target(_Constant(torch.zeros(4, V)), kernel, schedule, z_t, times,
                             torch.Generator())  # fmt: skip
    assert torch.equal(target, torch.nn.functional.one_hot(z_t, V).float())


def _weights(run_dir):
    return load_run(run_dir, use_ema=False).model.state_dict()


def test_distill_cli_runs_and_writes_student_runs(tiny_run, tmp_path, capsys):
    out = tmp_path / "students"
    argv = ["distill", "--teacher", str(tiny_run / "run"), "--out", str(out), "--rounds", "4,2",
            "--steps", "2", "--set", "train.lr=1e-4"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"student for T=4: {out / 'T4'}" in printed and "T=2" in printed
    for steps in (4, 2):
        loaded = load_run(out / f"T{steps}")
        assert loaded.step == 2 and loaded.config.train.lr == 1e-4
        meta = json.loads((loaded.checkpoint / "meta.json").read_text())
        assert meta["distill"]["steps"] == steps
    t2 = json.loads((load_run(out / "T2").checkpoint / "meta.json").read_text())
    assert "T4" in t2["distill"]["teacher"]  # round 2 learns from round 1's student
    assert main(argv) == 2  # a second run needs --resume
    assert "already holds a distillation round" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0  # everything finished: nothing to do


def test_stopped_distillation_resumes_exactly(tiny_run, tmp_path, monkeypatch):
    teacher = tiny_run / "run"
    straight = distill(teacher, tmp_path / "a", [4, 2], 3)
    assert straight.last.step == 3
    real_step = distill_mod.Distiller.train_step

    def ctrl_c_in_round_two(self):  # a real SIGINT in step 2: that step ends, then it stops
        if self.meta["distill"]["steps"] == 2 and self.state.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self)

    monkeypatch.setattr(distill_mod.Distiller, "train_step", ctrl_c_in_round_two)
    stopped = distill(teacher, tmp_path / "b", [4, 2], 3)
    assert stopped.last.interrupted and stopped.last.step == 2
    assert stopped.students == {4: tmp_path / "b" / "T4", 2: tmp_path / "b" / "T2"}
    monkeypatch.setattr(distill_mod.Distiller, "train_step", real_step)
    resumed = distill(teacher, tmp_path / "b", [4, 2], 3, resume=True)
    assert resumed.last.step == 3
    for steps in (4, 2):
        wa, wb = _weights(tmp_path / "a" / f"T{steps}"), _weights(tmp_path / "b" / f"T{steps}")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), steps
    first = _weights(teacher)
    assert not all(torch.equal(first[k], wa[k]) for k in first)  # the student did move


def test_distill_user_errors(tiny_run, tmp_path, capsys):
    base = ["distill", "--teacher", str(tiny_run / "run"), "--out", str(tmp_path / "s")]
    for rounds, steps in (("4,4", "2"), ("2,4", "2"), ("0", "2"), ("4", "0"), ("4,x", "2")):
        assert main([*base, "--rounds", rounds, "--steps", steps]) == 2
        assert ("--steps" if steps == "0" else "--rounds") in capsys.readouterr().err
    missing = ["distill", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "s"),
               "--rounds", "2", "--steps", "1"]  # fmt: skip
    assert main(missing) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    kernel = [*base, "--rounds", "2", "--steps", "1", "--set", "kernel.k=0.5"]
    assert main(kernel) == 2
    assert "do not --set kernel" in capsys.readouterr().err


def _student_cfg(teacher, *sets):
    from xdlm.config import apply_overrides
    from xdlm.runs import latest_config

    return apply_overrides(latest_config(teacher), ["train.steps=1", *sets])


def test_a_new_student_starts_from_the_teacher_and_freezes_it(tiny_run, tmp_path):
    teacher = tiny_run / "run"
    student = distill_mod.Distiller(_student_cfg(teacher), tmp_path / "T2", teacher, 2)
    try:
        want = load_run(teacher).model.state_dict()  # the teacher's EMA weights
        got = student.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert student.ema.num_updates == 0 and student.ema.decay == 0.9  # the config's
        assert all(torch.equal(student.ema.shadow[k], want[k]) for k in student.ema.shadow)
        assert not student.teacher.training
        assert not any(p.requires_grad for p in student.teacher.parameters())
        assert student.loss_fn.keywords == {"teacher": student.teacher, "steps": 2}
        ckpt = load_run(teacher).checkpoint
        assert student.meta["distill"] == {"teacher": str(ckpt), "steps": 2}
    finally:
        student.close()


def test_a_resumed_round_keeps_its_own_weights(tiny_run, tmp_path):
    teacher = tiny_run / "run"
    distill(teacher, tmp_path / "s", [2], 1)
    mine = _weights(tmp_path / "s" / "T2")
    again = distill_mod.Distiller(_student_cfg(teacher, "train.steps=2"), tmp_path / "s" / "T2",
                                  teacher, 2, resume=True)  # fmt: skip
    try:
        got = again.model.state_dict()
        assert again.state.step == 1 and all(torch.equal(got[k], mine[k]) for k in mine)
    finally:
        again.close()


def test_a_teacher_of_another_kernel_is_refused_and_the_run_released(tiny_run, tmp_path):
    teacher = tiny_run / "run"
    cfg = _student_cfg(teacher, "kernel.k=0.5")
    with pytest.raises(ValueError, match=r"^teacher \S+ has kernel \{.*\} but the student config "
                       r"gives \{.*\}; do not --set kernel.\* for distill$"):  # fmt: skip
        distill_mod.Distiller(cfg, tmp_path / "T2", teacher, 2)
    distill_mod.Distiller(_student_cfg(teacher), tmp_path / "T2", teacher, 2).close()  # unlocked


def test_rounds_must_strictly_decrease_from_at_least_one():
    distill_mod.check_rounds([1], 1)  # the smallest valid rounds and steps
    distill_mod.check_rounds([3, 2, 1], 5)
    rounds_error = (r"^--rounds \(distill rounds\) must be strictly decreasing step counts >= 1, "
                    r"e.g. 16,8,4; got ")  # fmt: skip
    for rounds in ([], [0], [2, 0], [2, 2], [1, 2]):
        with pytest.raises(ValueError, match=rounds_error + re.escape(str(rounds)) + "$"):
            distill_mod.check_rounds(rounds, 1)
    with pytest.raises(ValueError, match=r"^--steps \(optimizer steps per round\) must be >= 1, "
                       r"got 0$"):  # fmt: skip
        distill_mod.check_rounds([2], 0)


def test_finished_rounds_are_skipped_and_started_ones_need_resume(tiny_run, tmp_path):
    teacher, out = tiny_run / "run", tmp_path / "s"
    assert distill_mod.round_dir(out, 4) == out / "T4"
    done = distill(teacher, out, [4, 2], 2)
    assert done.students == {4: out / "T4", 2: out / "T2"} and done.last.step == 2
    again = distill(teacher, out, [4, 2], 2, resume=True)  # each round reached its steps
    assert again.students == done.students and again.last is None
    fresh = tmp_path / "f"
    (fresh / "T2").mkdir(parents=True)
    (fresh / "T2" / "config.yaml").write_text("{}\n")  # a round that failed before a checkpoint
    with pytest.raises(ValueError, match=r"T2 already holds a distillation round; pass --resume "
                       r"to continue it or choose a new --out$"):  # fmt: skip
        distill(teacher, fresh, [2], 1)


@pytest.fixture
def remote_teacher(tiny_run, tmp_path):
    """A copy of tiny_run's run whose saved config declares an HF model with its own code."""
    import shutil

    from run_fixtures import rewrite_meta

    run = shutil.copytree(tiny_run / "run", tmp_path / "remote")
    hf = {"backbone": "hf", "hf_name": "gpt2", "trust_remote_code": True}
    for ckpt in (run / "checkpoints").glob("step_*"):
        rewrite_meta(ckpt, lambda m: m["config"]["model"].update(hf))
    return run


def test_a_teacher_running_its_own_code_needs_the_callers_trust(tiny_run, remote_teacher, tmp_path):
    flag = r"--trust-remote-code on the command line"
    with pytest.raises(ValueError, match=r"meta.json: .*" + flag):
        distill(remote_teacher, tmp_path / "s", [2], 1)
    with pytest.raises(ValueError, match=r"meta.json: .*" + flag):
        distill_mod.Distiller(_student_cfg(tiny_run / "run"), tmp_path / "T2", remote_teacher, 2)
    sets = ["model.backbone=hf", "model.hf_name=gpt2", "model.trust_remote_code=true"]
    with pytest.raises(ValueError, match=r"^--set: .*" + flag):
        distill(tiny_run / "run", tmp_path / "s", [2], 1, overrides=sets)


def test_the_callers_trust_reaches_every_load_of_the_teacher(tiny_run, tmp_path, monkeypatch):
    """What `--trust-remote-code` grants is passed on to each read of the teacher run (a native
    teacher is unaffected by it)."""
    seen = []

    def spy(name, real):
        def call(run_dir, *args, **kwargs):
            seen.append((name, kwargs.get("trust_remote_code", args[-1] if args else None)))
            return real(run_dir, *args, **kwargs)

        return call

    monkeypatch.setattr(distill_mod, "latest_config", spy("config", distill_mod.latest_config))
    monkeypatch.setattr(distill_mod, "load_run", spy("run", distill_mod.load_run))
    result = distill(tiny_run / "run", tmp_path / "s", [2], 1, trust_remote_code=True)
    assert result.last.step == 1
    assert seen == [("config", True), ("run", True)]
