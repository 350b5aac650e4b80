"""lm-eval's code tasks execute model-written programs only in the sandbox.

    install()    # done on importing xdlm.eval.lm_eval_adapter: `xdlm lm-eval`,
                 # `xdlm reproduce llada` and any lm_eval.simple_evaluate after that import

lm-eval 0.4.13 runs generated code where a task marked `unsafe_code: true` computes its metric:
MBPP, MBPP-instruct, HumanEval(-instruct, -64) and HumanEval-infilling call Hugging Face
`evaluate.load("code_eval")` when their `utils.py` is imported, and `exec` the programs on the
host. `install()` makes this process's

- `evaluate.load("code_eval")` return `SandboxedCodeEval` (same interface, every program run by
  `run_sandboxed`), so those tasks' metrics and a yaml `metric: code_eval` run sandboxed;
- `lm_eval.evaluator.evaluate` refuse, before any generation, an unsafe task whose code does not
  go through it (`check_code_tasks`: e.g. cruxeval and longproc, which execute code their own
  way, or a task module imported before `install()`), and probe that the sandbox can start;
  lm-eval's own `confirm_run_unsafe_code` check follows.

Which task runs code is lm-eval's `unsafe_code` marking; a task that executes code without it is
not detected.
"""

from __future__ import annotations

import functools
import inspect

from xdlm.eval.code_eval import SandboxedCodeEval
from xdlm.eval.sandbox import SandboxUnavailableError, check_isolation

_CODE_EVAL = ("code_eval", "evaluate-metric/code_eval")


def install() -> None:
    """Route `evaluate`'s code_eval through the sandbox and guard lm-eval's `evaluate`
    (idempotent; lasts for the process)."""
    import evaluate
    from lm_eval import evaluator

    if not getattr(evaluate.load, "_xdlm_sandboxed", False):
        evaluate.load = _sandboxed_load(evaluate.load)
    if not getattr(evaluator.evaluate, "_xdlm_sandboxed", False):
        evaluator.evaluate = _guarded_evaluate(evaluator.evaluate)


def _sandboxed_load(load):
    @functools.wraps(load)
    def sandboxed_load(path, *args, **kwargs):
        if str(path).rstrip("/") in _CODE_EVAL:
            return SandboxedCodeEval()
        return load(path, *args, **kwargs)

    sandboxed_load._xdlm_sandboxed = True
    return sandboxed_load


def _guarded_evaluate(evaluate_fn):
    signature = inspect.signature(evaluate_fn)

    @functools.wraps(evaluate_fn)
    def evaluate(*args, **kwargs):
        check_code_tasks(signature.bind(*args, **kwargs).arguments["task_dict"])
        return evaluate_fn(*args, **kwargs)

    evaluate._xdlm_sandboxed = True
    return evaluate


def check_code_tasks(task_dict) -> None:
    """Refuse (ValueError naming the task) any task marked unsafe whose metrics or
    process_results do not execute code through `SandboxedCodeEval`; where one does, check that
    the sandbox can start (ValueError with the fix otherwise)."""
    unsafe = [t for t in _tasks(task_dict) if getattr(t, "UNSAFE_CODE", False)]
    for task in unsafe:
        metric_fns = list(getattr(task, "_metric_fn_list", {}).values())
        process = getattr(getattr(task, "config", None), "process_results", None)
        code_paths = [fn for fn in [*metric_fns, process] if fn is not None]
        if not code_paths or not all(_routed(fn) for fn in code_paths):
            raise ValueError(
                f"task {_name(task)!r} runs model-written code that xdlm cannot route through "
                "its sandbox (only tasks computing evaluate's code_eval, e.g. mbpp and "
                "humaneval, are routed); drop it from --tasks"
            )
    if unsafe:
        try:
            check_isolation()
        except SandboxUnavailableError as err:
            raise ValueError(f"code tasks {[_name(t) for t in unsafe]}: {err}") from None


def _routed(fn) -> bool:
    """Whether `fn` is a `SandboxedCodeEval`'s method, or a function (or its `__call__`) whose
    module holds one, as the lm-eval task modules hold their code_eval object."""
    owner = getattr(fn, "__self__", fn)
    if isinstance(owner, SandboxedCodeEval):
        return True
    module_globals = getattr(owner, "__globals__", None) or {}
    return any(isinstance(v, SandboxedCodeEval) for v in module_globals.values())


def _tasks(node) -> list:
    """Every lm-eval Task in a task dict (its "tasks" entry, or the older nested layout)."""
    from lm_eval.api.task import Task

    if isinstance(node, Task):
        return [node]
    if isinstance(node, dict):
        return [t for v in node.values() for t in _tasks(v)]
    return []


def _name(task) -> str:
    return getattr(getattr(task, "config", None), "task", None) or type(task).__name__
