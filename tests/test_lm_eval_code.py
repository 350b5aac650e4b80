"""lm-eval's code tasks run model-written programs only in the sandbox (issue 27.2).

The real MBPP and HumanEval task configs and metric functions of the installed lm-eval, with
local documents (offline: `include:` of lm-eval's own yaml, only the dataset replaced) and a
model that returns fixed completions: a correct one, a wrong one and a hostile one (writes a
file on the host, connects to a loopback listener, then solves the task). The `xdlm lm-eval`
versions are slow (lm-eval indexes its ~10k task files): `python -m pytest -m slow
tests/test_lm_eval_code.py`."""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest
from test_sandbox import needs_bwrap

lm_eval = pytest.importorskip("lm_eval")
import evaluate  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import xdlm.eval.lm_eval_adapter  # noqa: E402, F401  (installs the hook, as `xdlm lm-eval` does)
from xdlm.cli import main  # noqa: E402
from xdlm.eval import sandbox  # noqa: E402
from xdlm.eval.code_eval import SandboxedCodeEval  # noqa: E402
from xdlm.eval.sandbox import SandboxUnavailableError  # noqa: E402

TASKS = Path(lm_eval.__file__).parent / "tasks"
HOSTILE = """\
import socket
for attack in (lambda: open({path!r}, "w").write("escaped"),
               lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1).sendall(b"x")):
    try:
        attack()
    except OSError:
        pass
"""
ADD = {"right": "return a + b", "wrong": "return a - b"}


@register_model("xdlm_test_canned")
class Canned(LM):
    """Answers each prompt with the completion of the first key ("P0", ...) it contains."""

    completions: dict[str, str] = {}
    prompts: list[str] = []

    def __init__(self, **_):
        super().__init__()

    def generate_until(self, requests):
        Canned.prompts += [r.args[0] for r in requests]
        return [next(v for k, v in self.completions.items() if k in r.args[0]) for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def _mbpp(path, port):
    tests = ["assert add(2, 3) == 5", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]
    docs = [{"task_id": i, "text": f"P{i} add two numbers", "code": "", "test_list": tests}
            for i in range(3)]  # fmt: skip
    right, wrong = (f"def add(a, b):\n    {ADD[w]}\n" for w in ("right", "wrong"))
    completions = [right, wrong, HOSTILE.format(path=path, port=port) + right]
    return "mbpp/mbpp.yaml", docs, completions, "pass_at_1"


def _humaneval(path, port):
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    docs = [{"task_id": f"H/{i}", "prompt": f"# P{i}\ndef add(a, b):\n", "test": test,
             "entry_point": "add", "canonical_solution": ""} for i in range(3)]  # fmt: skip
    right, wrong = (f"    {ADD[w]}\n" for w in ("right", "wrong"))
    hostile = textwrap.indent(HOSTILE.format(path=path, port=port), "    ")
    completions = [right, wrong, hostile + right]
    return "humaneval/humaneval.yaml", docs, completions, "pass@1"


def _local_task(tmp_path, base: str, docs: list[dict], name: str) -> TaskManager:
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / f"{name}.yaml").write_text(
        f"include: {TASKS / base}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\nnum_fewshot: 0\n"
    )
    return TaskManager(include_path=str(tmp_path), include_defaults=False)


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):  # nothing ever connected
        sock.accept()
    sock.close()


@needs_bwrap
@pytest.mark.parametrize("spec", [_mbpp, _humaneval], ids=["mbpp", "humaneval"])
def test_code_task_metric_runs_in_the_sandbox(spec, tmp_path, listener):
    escaped = tmp_path / "escaped.txt"
    base, docs, completions, metric = spec(str(escaped), listener.getsockname()[1])
    Canned.completions = {f"P{i}": c for i, c in enumerate(completions)}
    manager = _local_task(tmp_path, base, docs, "xdlm_code_local")
    res = simple_evaluate(model=Canned(), tasks=["xdlm_code_local"], task_manager=manager,
                          confirm_run_unsafe_code=True, log_samples=True)  # fmt: skip
    samples = sorted(res["samples"]["xdlm_code_local"], key=lambda s: s["doc_id"])
    assert [s[metric] for s in samples] == [1.0, 0.0, 1.0]  # right, wrong, hostile (contained)
    assert not escaped.exists()
    assert isinstance(evaluate.load("code_eval"), SandboxedCodeEval)


UNROUTED = """\
def run_on_host(references, predictions):
    exec(predictions[0] + "\\n" + references[0], {})
    return 1.0
"""


def _unrouted_task(tmp_path) -> TaskManager:
    """An unsafe task whose metric executes the completion itself (like cruxeval)."""
    (tmp_path / "utils.py").write_text(UNROUTED)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"q": "P0", "t": "pass"}) + "\n")
    (tmp_path / "host_exec.yaml").write_text(
        "task: host_exec\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\nunsafe_code: true\n"
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{t}}'\n"
        "metric_list:\n  - metric: !function utils.run_on_host\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return TaskManager(include_path=str(tmp_path), include_defaults=False)


def test_a_code_task_that_cannot_be_routed_is_refused_before_generation(tmp_path):
    marker = tmp_path / "ran_on_host.txt"
    Canned.completions, Canned.prompts = {"P0": f"open({str(marker)!r}, 'w')"}, []
    with pytest.raises(ValueError, match="task 'host_exec' runs model-written code that xdlm"):
        simple_evaluate(model=Canned(), tasks=["host_exec"], task_manager=_unrouted_task(tmp_path),
                        confirm_run_unsafe_code=True)  # fmt: skip
    assert Canned.prompts == [] and not marker.exists()


def test_code_tasks_are_refused_without_the_sandbox(tmp_path, monkeypatch):
    def unavailable(interpreter, as_user):
        raise SandboxUnavailableError("cannot isolate model-written code: no bwrap here")

    monkeypatch.setattr(sandbox, "_check_bwrap", unavailable)
    Canned.completions, Canned.prompts = {"P0": "def add(a, b):\n    return a + b\n"}, []
    base, docs, _, _ = _mbpp("unused", 0)
    manager = _local_task(tmp_path, base, docs[:1], "xdlm_code_nobwrap")
    with pytest.raises(ValueError, match="no bwrap here"):
        simple_evaluate(model=Canned(), tasks=["xdlm_code_nobwrap"], task_manager=manager,
                        confirm_run_unsafe_code=True)  # fmt: skip
    assert Canned.prompts == []


@needs_bwrap
def test_lm_evals_own_consent_is_still_required(tmp_path):
    Canned.completions, Canned.prompts = {"P0": "def add(a, b):\n    return a + b\n"}, []
    base, docs, _, _ = _mbpp("unused", 0)
    manager = _local_task(tmp_path, base, docs[:1], "xdlm_code_consent")
    with pytest.raises(ValueError, match="marked as unsafe"):
        simple_evaluate(model=Canned(), tasks=["xdlm_code_consent"], task_manager=manager)
    assert Canned.prompts == []


def test_reproduce_llada_evaluates_with_the_hook(monkeypatch):
    from xdlm.eval.reproduce import llada_table

    seen = {}

    def fake_simple_evaluate(**kwargs):
        seen["guarded"] = getattr(lm_eval.evaluator.evaluate, "_xdlm_sandboxed", False)
        seen["code_eval"] = type(evaluate.load("code_eval")).__name__
        return {"results": {"mbpp": {}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    llada_table("local/model", ["mbpp"], trust_remote_code=True)
    assert seen == {"guarded": True, "code_eval": "SandboxedCodeEval"}


@needs_bwrap
@pytest.mark.slow  # ~40 s on 2 shared cores, mostly lm-eval indexing its tasks
def test_xdlm_lm_eval_contains_a_hostile_mbpp_completion(tmp_path, listener):
    escaped = tmp_path / "escaped.txt"
    base, docs, completions, _ = _mbpp(str(escaped), listener.getsockname()[1])
    Canned.completions = {f"P{i}": c for i, c in enumerate(completions)}
    _local_task(tmp_path, base, docs, "xdlm_code_cli")
    out = tmp_path / "out"
    argv = ["lm-eval", "--model", "xdlm_test_canned", "--tasks", "xdlm_code_cli",
            "--include_path", str(tmp_path), "--confirm_run_unsafe_code", "--log_samples",
            "--output_path", str(out)]  # fmt: skip
    assert main(argv) == 0
    (samples,) = out.rglob("samples_xdlm_code_cli_*.jsonl")
    rows = sorted(map(json.loads, samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["pass_at_1"] for s in rows] == [1.0, 0.0, 1.0]
    assert not escaped.exists()


@pytest.mark.slow  # ~40 s on 2 shared cores, mostly lm-eval indexing its tasks
def test_xdlm_lm_eval_refuses_an_unrouted_code_task(tmp_path, capsys):
    marker = tmp_path / "ran_on_host.txt"
    Canned.completions = {"P0": f"open({str(marker)!r}, 'w')"}
    _unrouted_task(tmp_path)
    argv = ["lm-eval", "--model", "xdlm_test_canned", "--tasks", "host_exec",
            "--include_path", str(tmp_path), "--confirm_run_unsafe_code"]  # fmt: skip
    assert main(argv) == 2
    assert "task 'host_exec' runs model-written code" in capsys.readouterr().err
    assert not marker.exists()
