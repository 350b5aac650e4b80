"""pass@k of model-written programs, every program run by `xdlm.eval.sandbox.run_sandboxed`.

    out = code_eval(predictions=[["def add(a, b): return a + b"]],
                    references=["assert add(2, 3) == 5"], k=[1])
    out.pass_at_k        # {"pass@1": 1.0}: the mean over problems of pass_at_k(n, c, k)
    out.results[0][0]    # SandboxResult of problem 0, candidate 0

Each program is `candidate + "\\n" + test` (the layout of Hugging Face `evaluate`'s "code_eval"
metric, which lm-eval's MBPP / HumanEval tasks use). `SandboxedCodeEval` has that metric's
`compute(predictions, references, k, num_workers, timeout)` signature and return value; the
lm-eval hook (`xdlm.eval.lm_eval_code`) hands it to those tasks in place of the metric, so their
programs never run on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from xdlm.eval.sandbox import SandboxResult, SandboxUnavailableError, pass_at_k, run_sandboxed


@dataclass(frozen=True)
class CodeEvalResult:
    """pass_at_k: {"pass@k": mean over problems} for each k that every problem has at least k
    candidates for; results[i][j]: the sandbox's verdict on candidate j of problem i."""

    pass_at_k: dict[str, float]
    results: list[list[SandboxResult]]


def code_eval(
    predictions: Sequence[Sequence[str]], references: Sequence[str], k: int | Sequence[int] = 1,
    *, num_workers: int = 4, timeout_s: float = 3.0, memory_mb: int = 1024,
) -> CodeEvalResult:  # fmt: skip
    """Run candidate j of problem i followed by test i in the sandbox, for all i, j.

    Args:
        predictions: per problem, its candidate programs (n_i ≥ 1 strings).
        references: per problem, the test code run after each candidate.
        k: the k of pass@k (an int or several).
        num_workers: sandboxes run at once; memory_mb: limit of each program's process tree;
            timeout_s: its wall-clock limit, counted from the sandbox's start (bubblewrap and
            the interpreter take about 0.2 s of it).
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"code_eval needs one test per problem: {len(predictions)} predictions, "
            f"{len(references)} references"
        )
    ks = [k] if isinstance(k, int) else list(k)
    pairs = enumerate(zip(predictions, references, strict=True))
    jobs = [(i, cand + "\n" + test) for i, (cands, test) in pairs for cand in cands]
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        verdicts = list(pool.map(lambda job: run_sandboxed(job[1], timeout_s, memory_mb), jobs))
    results: list[list[SandboxResult]] = [[] for _ in references]
    for (i, _), verdict in zip(jobs, verdicts, strict=True):
        results[i].append(verdict)
    scores = {}
    for kk in ks:
        if results and all(len(r) >= kk for r in results):
            per_problem = [pass_at_k(len(r), sum(v.passed for v in r), kk) for r in results]
            scores[f"pass@{kk}"] = sum(per_problem) / len(per_problem)
    return CodeEvalResult(scores, results)


class SandboxedCodeEval:
    """Stands in for `evaluate.load("code_eval")`: same `compute` arguments and return value
    ((pass_at_k dict, {problem: [(candidate, {"task_id", "completion_id", "passed",
    "result"})]})), each program run in the sandbox instead of on the host."""

    def compute(
        self, *, predictions, references, k=(1, 10, 100), num_workers: int = 4,
        timeout: float = 3.0,
    ) -> tuple[dict[str, float], dict[int, list]]:  # fmt: skip
        try:
            out = code_eval(predictions, references, k, num_workers=num_workers, timeout_s=timeout)
        except SandboxUnavailableError as err:  # one line from the CLI, not a traceback
            raise ValueError(f"code_eval runs model-written code only sandboxed: {err}") from None
        details = {
            i: [(j, {"task_id": i, "completion_id": j, "passed": v.passed, "result": v.status})
                for j, v in enumerate(verdicts)]
            for i, verdicts in enumerate(out.results)
        }  # fmt: skip
        return out.pass_at_k, details
