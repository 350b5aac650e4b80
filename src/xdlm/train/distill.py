"""Progressive few-step distillation of a trained run, for any k (`xdlm distill`).

    from xdlm.train.distill import distill
    result = distill("runs/teacher", "runs/student", rounds=[16, 8, 4], steps_per_round=200)
    result.students  # {16: Path("runs/student/T16"), 8: ..., 4: ...}: ordinary run dirs

Round r trains a student for `rounds[r]` sampling steps from the teacher of that round (the
given run for the first, then the previous round's student), with the two-half-step targets of
`xdlm.sampling.distill` as the loss. Each round is an ordinary run of the train loop
(`Distiller` is a `Trainer` whose `loss_fn` is the distillation loss): config.yaml, metrics,
atomic checkpoints and an exact `resume`. The student starts from the teacher's (EMA) weights
and uses the teacher's config (data, model, kernel) with the user's overrides (`--set`), its
`train.steps` being `steps_per_round`. A stopped distillation resumes where it was: finished
rounds are skipped, the unfinished one continues from its newest checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from xdlm.builders import grant_remote_code
from xdlm.config import XDLMConfig, apply_overrides
from xdlm.models.ema import EMA
from xdlm.runs import find_checkpoint, latest_config, load_run, read_meta
from xdlm.sampling.distill import distillation_loss
from xdlm.train.checkpoint import has_checkpoint
from xdlm.train.loop import Trainer, TrainResult


class Distiller(Trainer):
    """A `Trainer` of a student for `steps` sampling steps against a frozen teacher run."""

    def __init__(
        self, cfg: XDLMConfig, run_dir: str | Path, teacher_dir: str | Path, steps: int,
        resume: bool = False, trust_remote_code: bool = False,
    ):  # fmt: skip
        super().__init__(cfg, run_dir, resume)
        try:
            teacher = load_run(
                teacher_dir, device=self.ctx.device, trust_remote_code=trust_remote_code
            )
            if teacher.kernel.spec() != self.kernel.spec():
                raise ValueError(
                    f"teacher {teacher_dir} has kernel {teacher.kernel.spec()} but the student "
                    f"config gives {self.kernel.spec()}; do not --set kernel.* for distill"
                )
            if self.state.step == 0:  # a new round starts from the teacher's weights
                self.model.load_state_dict(teacher.model.state_dict())
                if self.ema is not None:
                    self.ema = EMA(self.model, cfg.train.ema_decay)
        except BaseException:
            self.close()
            raise
        self.teacher = teacher.model.requires_grad_(False).eval()
        self.loss_fn = partial(distillation_loss, teacher=self.teacher, steps=steps)
        self.meta["distill"] = {"teacher": str(teacher.checkpoint), "steps": steps}


@dataclass(frozen=True)
class DistillResult:
    """The run dir of each round's student, keyed by its number of sampling steps."""

    students: dict[int, Path]
    last: TrainResult | None


def check_rounds(rounds: list[int], steps_per_round: int) -> None:
    """ValueError unless rounds is a non-empty, strictly decreasing list of T ≥ 1."""
    decreasing = all(a > b for a, b in zip(rounds, rounds[1:], strict=False))
    if not rounds or min(rounds) < 1 or not decreasing:
        raise ValueError(
            f"--rounds (distill rounds) must be strictly decreasing step counts >= 1, e.g. "
            f"16,8,4; got {rounds}"
        )
    if steps_per_round < 1:
        raise ValueError(f"--steps (optimizer steps per round) must be >= 1, got {steps_per_round}")


def round_dir(out: str | Path, steps: int) -> Path:
    """OUT/T<steps>: the run dir of the student for `steps` sampling steps."""
    return Path(out) / f"T{steps}"


def distill(
    teacher: str | Path,
    out: str | Path,
    rounds: list[int],
    steps_per_round: int,
    overrides: list[str] | None = None,
    resume: bool = False,
    trust_remote_code: bool = False,
) -> DistillResult:
    """Run (or, with `resume`, continue) the rounds; see the module docstring.
    `trust_remote_code` is the user's `--trust-remote-code` of this invocation: a teacher whose
    model runs its own code is refused without it, whatever its saved config says."""
    check_rounds(rounds, steps_per_round)
    if not has_checkpoint(teacher):
        raise FileNotFoundError(f"--teacher {teacher} holds no checkpoint; train it first")
    sets = [*(overrides or []), f"train.steps={steps_per_round}"]
    base = latest_config(teacher, trust_remote_code)
    base = grant_remote_code(apply_overrides(base, sets), trust_remote_code, "--set")
    students, last, source = {}, None, Path(teacher)
    for steps in rounds:
        run_dir = round_dir(out, steps)
        students[steps] = run_dir
        started = has_checkpoint(run_dir) or (run_dir / "config.yaml").is_file()
        if started and not resume:
            raise ValueError(f"{run_dir} already holds a distillation round; pass --resume "
                             "to continue it or choose a new --out")  # fmt: skip
        if not (has_checkpoint(run_dir) and _finished(run_dir, steps_per_round)):
            trainer = Distiller(base, run_dir, source, steps, started, trust_remote_code)
            try:
                last = trainer.run()
            finally:
                trainer.close()
            if last.interrupted:
                return DistillResult(students, last)
        source = run_dir
    return DistillResult(students, last)


def _finished(run_dir: Path, steps: int) -> bool:
    return read_meta(find_checkpoint(run_dir))["step"] >= steps
