"""`xdlm lm-eval`: lm-eval's CLI with the adapter registered, end to end offline (a tiny random
Llama saved to disk, a local multiple-choice task); the adapter's batching and arguments."""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import tiny_config, tiny_tokenizer

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from xdlm.cli import main  # noqa: E402
from xdlm.eval.lm_eval_adapter import XDLMHarnessLM  # noqa: E402
from xdlm.models.hf import HFDenoiser  # noqa: E402
from xdlm.models.hf_data import prepare_tokenizer  # noqa: E402

TASK = """task: austen_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
DOCS = [
    {"question": "It is a truth universally", "choices": [" acknowledged", " denied"], "answer": 0},
    {"question": "Mr. Darcy was", "choices": [" proud", " a horse", " tall"], "answer": 0},
    {"question": "Elizabeth", "choices": [" Bennet", " smiled"], "answer": 1},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    prepare_tokenizer(tok)
    torch.manual_seed(0)
    HFDenoiser.from_config(tiny_config("llama", vocab_size=len(tok))).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _harness(model_dir, **kw):
    return XDLMHarnessLM(pretrained=str(model_dir), mc_samples=3, max_length=32, **kw)


def test_batched_scores_equal_one_at_a_time(model_dir):
    args = [(d["question"], c) for d in DOCS for c in d["choices"]] + [("a", "")]
    reqs = [Instance("loglikelihood", {}, a, i, ("t", i, 1)) for i, a in enumerate(args)]
    one = _harness(model_dir).loglikelihood(reqs)
    four = _harness(model_dir, batch_size="4").loglikelihood(reqs)
    assert [g for _, g in one] == [g for _, g in four] and four[-1] == (0.0, True)
    for (a, _), (b, _) in zip(one, four, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)


def test_arguments_are_checked(model_dir):
    with pytest.raises(ValueError, match=r"unknown xdlm model_args \['mc_sample'\].*mc_samples"):
        _harness(model_dir, mc_sample=4)
    with pytest.raises(ValueError, match="batch_size='auto' is not supported"):
        _harness(model_dir, batch_size="auto")
    h = _harness(model_dir, batch_size="16", max_batch_size=5)
    assert h.batch_size == 5 and (h.rank, h.world_size) == (0, 1)


@pytest.mark.slow  # ~1 min on 2 shared cores: python -m pytest -m slow tests/test_lm_eval_cli.py
def test_cli_runs_a_local_task(model_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "austen_mc.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "results"
    argv = [
        "lm-eval", "--model", "xdlm", "--tasks", "austen_mc", "--include_path", str(tasks),
        "--model_args", f"pretrained={model_dir},mc_samples=2,max_length=32",
        "--batch_size", "2", "--device", "cpu", "--output_path", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    (result,) = out.rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["austen_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert json.loads(result.read_text())["config"]["batch_size"] in (2, "2")
