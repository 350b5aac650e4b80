"""Our pass@k harness: every candidate + test program runs in the sandbox (needs bubblewrap)."""

from __future__ import annotations

import pytest
from test_sandbox import needs_bwrap

from xdlm.eval.code_eval import SandboxedCodeEval, code_eval

RIGHT, WRONG = "def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"
TEST = "assert add(2, 3) == 5"


@needs_bwrap
def test_pass_at_k_over_sandboxed_programs():
    out = code_eval([[RIGHT, WRONG], [WRONG, WRONG]], [TEST, TEST], k=[1, 2, 3], num_workers=2)
    assert out.pass_at_k == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}
    assert [[v.status for v in r] for r in out.results] == [["passed", "failed"]] + [
        ["failed", "failed"]
    ]


@needs_bwrap
def test_compute_has_the_interface_of_evaluates_code_eval():
    scores, details = SandboxedCodeEval().compute(predictions=[[RIGHT]], references=[TEST], k=[1])
    assert scores == {"pass@1": 1.0}
    assert details == {0: [(0, {"task_id": 0, "completion_id": 0, "passed": True,
                                "result": "passed"})]}  # fmt: skip


def test_one_test_per_problem():
    with pytest.raises(ValueError, match="2 predictions, 1 references"):
        code_eval([[RIGHT], [RIGHT]], [TEST])
