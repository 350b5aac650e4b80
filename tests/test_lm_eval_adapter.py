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


class Oracle(torch.nn.Module):
    """Puts logit 60 on `target[l]` at every position l < len(target): knows one sequence."""

    def __init__(self, target: list[int], vocab_size: int):
        super().__init__()
        self.vocab_size, self.scale = vocab_size, torch.nn.Parameter(torch.tensor(60.0))
        self.target = torch.tensor(target)

    def forward(self, z, t, attention_mask=None, cond=None):
        logits = torch.zeros(*z.shape, self.vocab_size)
        n = min(z.shape[1], len(self.target))
        onehot = torch.nn.functional.one_hot(self.target[:n], self.vocab_size).float()
        logits[:, :n] = self.scale.detach() * onehot
        return logits


def _oracle_harness(harness, context: str, continuation: str) -> XDLMHarnessLM:
    """The harness's tokenizer with a denoiser that knows prefix ‖ context ‖ continuation."""
    tok = harness.tokenizer
    target = harness._prefix() + harness._encode(context) + harness._encode(continuation)
    return XDLMHarnessLM(denoiser=Oracle(target, len(tok)), tokenizer=tok, k=0.1, mc_samples=8)


def test_loglikelihood_of_an_oracle_is_zero_for_its_text_and_very_negative_otherwise(harness):
    """A denoiser that knows the continuation has NELBO ≈ 0 (p_θ(x) = 1 - e^-60·V) and is
    greedy; for another continuation every token costs ≈ 60 nats and greedy is False."""
    oracle = _oracle_harness(harness, "Mr.", " Darcy")
    (right, right_greedy), (wrong, wrong_greedy) = oracle.loglikelihood(
        _instances("loglikelihood", [("Mr.", " Darcy"), ("Mr.", " Bingley")])
    )
    assert abs(right) < 1e-6 and right_greedy
    assert wrong < -10.0 and not wrong_greedy


def test_is_greedy_is_the_one_step_argmax_of_the_model(harness):
    ctx = harness._prefix() + harness._encode("It is a truth")
    z = torch.tensor([ctx + [harness.kernel.mask_id] * 3])
    logits = harness.denoiser(z, None)[0, len(ctx) :].clone()
    logits[:, harness.kernel.mask_id] = float("-inf")
    best = logits.argmax(-1).tolist()  # the model's own greedy continuation, computed here
    other = best[:2] + [(best[2] + 1) % harness.kernel.mask_id]
    (_, greedy), (_, not_greedy) = harness._bounds([(ctx, best), (ctx, other)])
    assert greedy and not not_greedy


def test_loglikelihood_rolling_covers_every_token_once(harness, monkeypatch):
    text = "It is a truth universally acknowledged, that a single man in possession " * 3
    tokens = harness.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokens) > harness.max_length  # several windows
    calls = []
    real = harness._bounds

    def recording(pairs):
        out = real(pairs)
        calls.extend((list(c), list(y), b) for (c, y), (b, _) in zip(pairs, out, strict=True))
        return out

    monkeypatch.setattr(harness, "_bounds", recording)
    (score,) = harness.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    assert len(calls) > 1 and [t for _, c, _ in calls for t in c] == tokens  # a partition
    done = 0
    for context, continuation, _ in calls:
        full = harness._prefix() + tokens[:done]  # context: a suffix of the clean left text
        assert 1 <= len(context) and len(context) + len(continuation) <= harness.max_length
        assert context == full[-len(context) :]
        done += len(continuation)
    assert score == pytest.approx(sum(b for *_, b in calls)) and score < 0


def test_generate_until_stops_at_the_first_stop_string(harness):
    def gen(until):
        reqs = _instances("generate_until", [("Elizabeth", {"until": until, "max_gen_toks": 8})])
        return harness.generate_until(reqs)[0]

    full = gen([])
    ids = harness.generate_ids(harness._prefix() + harness._encode("Elizabeth"), 8)[0, -8:]
    assert full == harness.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    assert len(full) >= 3
    stop = full[2:4]
    assert gen([stop, "\n"]) == full[: full.index(stop)]


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


def test_xdm_rank_dtype_model_arg(harness):
    """The authors' ranking in the model's dtype by default; model_args xdm_rank_dtype=float64
    picks ours; a bad value is an error naming the setting."""
    assert harness.sampler.rank_dtype == "logits"
    objects = dict(denoiser=harness.denoiser, tokenizer=harness.tokenizer)
    precise = XDLMHarnessLM(**objects, xdm_rank_dtype="float64")
    assert precise.sampler == XDM(rank_dtype="float64")
    with pytest.raises(ValueError, match="rank_dtype"):
        XDLMHarnessLM(**objects, xdm_rank_dtype="bfloat16")


def test_simple_evaluate_on_a_local_task(harness, tmp_path):
    """lm_eval end to end with an oracle that knows "Mr. Darcy": it is right exactly on the
    two documents labelled Darcy, so acc = 2/3 (1/3 if the scores reached lm_eval reversed)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    docs = [{"q": "Mr.", "choices": ["Darcy", "Bingley"], "label": lab} for lab in (0, 1, 0)]
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
    oracle = _oracle_harness(harness, "Mr.", " Darcy")  # lm_eval joins with a space
    res = simple_evaluate(model=oracle, tasks=["xdlm_local_mc"], task_manager=manager)
    assert res["results"]["xdlm_local_mc"]["acc,none"] == pytest.approx(2 / 3)
