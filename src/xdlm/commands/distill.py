"""`xdlm distill`: few-step students of a trained run by progressive distillation (any k).

    xdlm distill --teacher runs/xdlm --out runs/xdlm-fewstep --rounds 16,8,4 --steps 200
    xdlm distill --teacher runs/xdlm --out runs/xdlm-fewstep --rounds 16,8,4 --steps 200 --resume
    xdlm sample --ckpt runs/xdlm-fewstep/T4 --steps 4          # the 4-step student

Round by round, a student for T sampling steps learns the teacher's two ancestral half-steps
in one (`xdlm.sampling.distill`); each round's student teaches the next. Every round is an
ordinary run dir OUT/T<T> (config, metrics, checkpoints), so a stopped distillation continues
exactly with --resume. `--set` overrides the teacher's config for the students (e.g.
train.lr=1e-4); the kernel, model and data stay the teacher's. A teacher whose model runs its own
Python code (an HF backbone with modeling_*.py) distils only with `--trust-remote-code` on this
command line; the teacher's saved config never grants it.
"""

from __future__ import annotations

import argparse

from xdlm.commands.options import add_trust_argument


def register(sub) -> None:
    p = sub.add_parser("distill", help="few-step students of a trained run",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--teacher", required=True, help="the trained run dir")
    p.add_argument("--out", required=True, help="dir of the rounds' run dirs (OUT/T<T>)")
    p.add_argument("--rounds", required=True,
                   help="student step counts, strictly decreasing, e.g. 16,8,4")  # fmt: skip
    p.add_argument("--steps", type=int, required=True, help="optimizer steps per round")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the students' config (repeatable)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue a stopped distillation")
    add_trust_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from xdlm.train.distill import distill

    try:
        rounds = [int(v) for v in args.rounds.split(",")]
    except ValueError:
        raise ValueError(f"--rounds must be integers like 16,8,4, got {args.rounds!r}") from None
    result = distill(
        args.teacher, args.out, rounds, args.steps, args.overrides, args.resume,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    for steps, path in result.students.items():
        print(f"student for T={steps}: {path}")
    return 130 if result.last is not None and result.last.interrupted else 0
