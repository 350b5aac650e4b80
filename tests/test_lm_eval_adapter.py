"""The lm-eval adapter on a tiny random HF model (offline). (The sandbox: test_sandbox.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hf_fixtures import tiny_config, tiny_tokenizer

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from xdlm.eval.lm_eval_adapter import XDLMHarnessLM  # noqa: E402
from xdlm.models.hf import HFDenoiser  # noqa: E402
from xdlm.models.hf_data import prepare_tokenizer  # noqa: E402
from xdlm.sampling import XDM, Confidence, fixed_from_template  # noqa: E402


@pytest.fixture(scope="module")
def harness():
    tok = tiny_tokenizer()
    prepare_tokenizer(tok)
    torch.manual_seed(0)
    model = HFDenoiser.from_config(tiny_config("llama", vocab_size=len(tok)))
    return XDLMHarnessLM(
        denoiser=model, tokenizer=tok, k=0.1, mc_samples=4, max_length=32, gen_length=8, steps=4
    )


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i, ("local", i, 1)) for i, a in enumerate(args)]


def test_loglikelihood_is_a_finite_negative_bound_and_deterministic(harness):
    reqs = _instances("loglikelihood", [("It is a truth", " universally"), ("Mr.", " Darcy")])
    out = harness.loglikelihood(reqs)
    assert len(out) == 2
    for logp, greedy in out:
        assert math.isfinite(logp) and logp < 0 and isinstance(greedy, bool)
    assert harness.loglikelihood(reqs) == out  # seeded Monte-Carlo
    assert harness.loglikelihood(_instances("loglikelihood", [("a", "")])) == [(0.0, True)]


def test_loglikelihood_rolling_chunks_long_text(harness):
    text = "It is a truth universally acknowledged, that a single man in possession " * 3
    n = len(harness.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n > harness.max_length  # several windows
    (score,) = harness.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    assert math.isfinite(score) and score < 0


def test_generate_until_returns_text_and_stops(harness):
    reqs = _instances("generate_until", [("Elizabeth", {"until": ["\n"], "max_gen_toks": 6})])
    (text,) = harness.generate_until(reqs)
    assert isinstance(text, str) and "\n" not in text


@pytest.mark.parametrize("sampler", ["xdm", "confidence"])
@pytest.mark.parametrize("block_length", [None, 4])
def test_generation_reveals_everything(harness, block_length, sampler):
    prompt = harness._prefix() + harness._encode("It is a truth universally acknowledged")
    harness.block_length, default = block_length, harness.sampler
    harness.sampler = {"xdm": XDM(), "confidence": Confidence()}[sampler]
    try:
        ids = harness.generate_ids(prompt, 8)
    finally:
        harness.block_length, harness.sampler = None, default
    assert ids.shape == (1, len(prompt) + 8)
    assert not (ids == harness.kernel.mask_id).any()
    if sampler == "confidence":  # ours freezes the prompt; the authors' may edit it
        assert ids[0, : len(prompt)].tolist() == prompt


def test_generation_defaults_to_the_xdm_sampler(harness):
    assert harness.sampler == XDM()
    prompt = harness._prefix() + harness._encode("Mr. Darcy")
    fixed = fixed_from_template(prompt, 1, len(prompt) + 8)
    direct = XDM().run(
        harness.denoiser, harness.kernel, batch_size=1, seq_len=len(prompt) + 8, steps=4,
        generator=None, fixed=fixed,
    )  # fmt: skip
    assert torch.equal(harness.generate_ids(prompt, 8), direct.tokens)
    with pytest.raises(ValueError, match="sampler"):
        XDLMHarnessLM(denoiser=harness.denoiser, tokenizer=harness.tokenizer, sampler="ancestral")


def test_simple_evaluate_on_a_local_task(harness, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    docs = [{"q": "Mr.", "choices": [" Darcy", " Bingley"], "label": 0}] * 3
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    task = {
        "task": "xdlm_local_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "data.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}],
    }
    (tmp_path / "task.yaml").write_text(json.dumps(task))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res = simple_evaluate(model=harness, tasks=["xdlm_local_mc"], task_manager=manager)
    acc = res["results"]["xdlm_local_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
