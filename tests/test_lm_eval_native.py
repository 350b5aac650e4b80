"""The lm-eval adapter on our own runs and exports (the `tiny_run` fixture: char tokenizer,
1-layer DiT, L = 32): their kernel, schedule, tokenizer and sampler, loglikelihood and
generation requests, lm-eval's CLI on local tasks, and the device rules of `xdlm lm-eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from xdlm.cli import main  # noqa: E402
from xdlm.eval.lm_eval_adapter import XDLMHarnessLM  # noqa: E402
from xdlm.runs import load_run  # noqa: E402

PAIRS = [("It is a truth", " universally"), ("Mr.", " Darcy"), ("a", "")]


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i, ("local", i, 1)) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def export_dir(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "xdlm-tiny"
    assert main(["export", str(tiny_run / "run"), str(out)]) == 0
    return out


def test_a_run_brings_its_own_kernel_schedule_tokenizer_and_length(tiny_run):
    run = load_run(tiny_run / "run")
    h = XDLMHarnessLM(pretrained=str(tiny_run / "run"), mc_samples=2)
    assert h.kernel == run.kernel and h.schedule == run.schedule and h.max_length == 32
    assert h.t_min == run.config.train.t_min and h.device_name == "cpu"  # auto, no GPU here
    text = "Elizabeth [MASK] Bennet"  # a literal "[MASK]" is text, as in training
    assert h._encode(text) == run.tokenizer.encode(text)
    assert h._prefix() == [run.tokenizer.bos_id]
    assert type(h.sampler).__name__ == "Ancestral"  # the run's sample.sampler, not xdm


def test_loglikelihood_of_a_run_is_a_finite_bound_shared_by_its_export(tiny_run, export_dir):
    """The run and its export (EMA weights both) give the same numbers: one scoring path."""
    reqs = _requests("loglikelihood", PAIRS)
    run = XDLMHarnessLM(pretrained=str(tiny_run / "run"), mc_samples=3, batch_size=2)
    scores = run.loglikelihood(reqs)
    for logp, greedy in scores[:2]:
        assert math.isfinite(logp) and logp < 0 and isinstance(greedy, bool)
    assert scores[2] == (0.0, True)
    assert XDLMHarnessLM(pretrained=str(export_dir), mc_samples=3).loglikelihood(reqs) == scores
    rolling = run.loglikelihood_rolling(_requests("loglikelihood_rolling", [("Mr. Darcy " * 8,)]))
    assert math.isfinite(rolling[0]) and rolling[0] < 0


def test_generation_uses_the_run_sampler_and_leaves_no_mask(tiny_run):
    h = XDLMHarnessLM(pretrained=str(tiny_run / "run"), steps=4, gen_length=8)
    prompt = h._prefix() + h._encode("Mr. Darcy")
    ids = h.generate_ids(prompt, 8)
    assert ids.shape == (1, len(prompt) + 8) and h.kernel.mask_id not in ids.tolist()[0]
    reqs = _requests("generate_until", [("Mr. Darcy", {"until": ["\n"], "max_gen_toks": 100})])
    (text,) = h.generate_until(reqs)  # 100 > L: cut to fit the run's 32 positions
    assert isinstance(text, str) and "\n" not in text and len(text) <= 31


def test_model_args_that_contradict_the_run_are_errors(tiny_run):
    run = str(tiny_run / "run")
    k = load_run(tiny_run / "run").kernel.k
    assert XDLMHarnessLM(pretrained=run, k=str(k)).kernel.k == k  # restating it is fine
    with pytest.raises(ValueError, match=r"trained with k=0.1, model_args say k=0.5"):
        XDLMHarnessLM(pretrained=run, k="0.5")
    with pytest.raises(ValueError, match="dtype=bfloat16 applies to Hugging Face backbones"):
        XDLMHarnessLM(pretrained=run, dtype="bfloat16")
    assert XDLMHarnessLM(pretrained=run, max_length=32).max_length == 32
    with pytest.raises(ValueError, match=r"max_length=33 > the run's training seq_len 32"):
        XDLMHarnessLM(pretrained=run, max_length=33)


MC_TASK = {
    "task": "austen_mc_native", "dataset_path": "json", "test_split": "test",
    "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}],
}  # fmt: skip
GEN_TASK = {
    "task": "austen_gen_native", "dataset_path": "json", "test_split": "test",
    "output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}",
    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8},
    "metric_list": [{"metric": "exact_match"}],
}  # fmt: skip


def _task_dir(tmp_path):
    docs = [{"q": "Mr.", "choices": [" Darcy", " Bingley"], "label": lab, "a": " Darcy"}
            for lab in (0, 1)]  # fmt: skip
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    for task in (MC_TASK, GEN_TASK):
        spec = {**task, "dataset_kwargs": {"data_files": {"test": str(data)}}}
        (tmp_path / f"{task['task']}.yaml").write_text(json.dumps(spec))
    return tmp_path


@pytest.mark.slow  # lm-eval's CLI, twice: ~40 s on 2 shared cores
def test_cli_evaluates_an_export_on_local_tasks_without_a_device_flag(export_dir, tmp_path):
    tasks, out = _task_dir(tmp_path), tmp_path / "results"
    argv = [
        "lm-eval", "--model", "xdlm", "--include_path", str(tasks),
        "--tasks", "austen_mc_native,austen_gen_native",
        "--model_args", f"pretrained={export_dir},mc_samples=2,steps=4",
        "--output_path", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    (result,) = out.rglob("results_*.json")
    results = json.loads(result.read_text())["results"]
    assert 0.0 <= results["austen_mc_native"]["acc,none"] <= 1.0
    assert 0.0 <= results["austen_gen_native"]["exact_match,none"] <= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line(export_dir, tmp_path, capsys):
    argv = ["lm-eval", "--model", "xdlm", "--include_path", str(_task_dir(tmp_path)),
            "--tasks", "austen_mc_native", "--device", "cuda",
            "--model_args", f"pretrained={export_dir}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("xdlm lm-eval: error: device 'cuda' requested but this torch sees no")


def test_xdlm_lm_eval_names_a_device_only_for_runs_that_name_none():
    from xdlm.commands.lmeval import with_device

    run = ["--model", "xdlm", "--tasks", "t"]
    assert with_device(run) == [*run, "--device", "cuda" if torch.cuda.is_available() else "cpu"]
    assert with_device([*run, "--device", "cpu"]) == [*run, "--device", "cpu"]
    assert with_device([*run, "--device=cpu"]) == [*run, "--device=cpu"]
    assert with_device(["ls", "tasks"]) == ["ls", "tasks"] and with_device([]) == []
    assert with_device(["--help"]) == ["--help"]
