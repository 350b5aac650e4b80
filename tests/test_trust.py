"""Trust comes from the command line (docs/security.md): a run, an export or a recipe never turns
on a model's own Python code, never sizes the work or names the outputs of `xdlm sample | eval`,
and its `checkpoints/latest` never leads out of the run. Every case goes through `xdlm.cli.main`.

The hostile model directory is LLaDA-shaped (tests/hf_fixtures.py) with one line added to its
configuration file that writes a marker file when Python imports it: the marker appears exactly
when the model's code runs.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from hf_fixtures import write_remote_model

from xdlm.builders import build_device, build_model
from xdlm.cli import main
from xdlm.config import XDLMConfig, load_config
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import LogLinear, schedule_spec
from xdlm.data.tokenizers import load_tokenizer_dir
from xdlm.run_checks import with_digest
from xdlm.runs import find_checkpoint, load_run
from xdlm.train.checkpoint import save_checkpoint

FLAG = "--trust-remote-code"


def _error(capsys) -> str:
    """The CLI's error output, which must be one line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def clean_code(tmp_path_factory) -> Path:
    """A LLaDA-shaped HF model directory (code, config.json, weights), V = the char tokenizer's."""
    from transformers import AutoConfig

    from xdlm.models.hf import HFDenoiser

    directory = tmp_path_factory.mktemp("models") / "clean_llada"
    write_remote_model(directory, vocab_size=_tokenizer_size())
    model = HFDenoiser.from_config(
        AutoConfig.from_pretrained(directory, trust_remote_code=True), trust_remote_code=True
    )
    model.save_pretrained(directory)
    return directory


def _tokenizer_size() -> int:
    from xdlm.data.tokenizers import load_tokenizer

    return load_tokenizer("char", corpus_texts=[_TEXT]).vocab_size


_TEXT = "It is a truth universally acknowledged, that a single man in possession of a fortune."


def _hostile(clean: Path, where: Path, marker: Path, with_code: bool = True) -> Path:
    """A copy of `clean` under a fresh name (Python imports it anew) whose configuration file
    writes `marker` on import; `with_code=False`: no .py files, config.json's auto_map names
    code in a Hub repo instead."""
    directory = where / f"llada_{uuid.uuid4().hex[:8]}"
    shutil.copytree(clean, directory)
    conf = directory / "configuration_tiny_llada.py"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    conf.write_text(payload + conf.read_text())
    if not with_code:
        for path in directory.glob("*.py"):
            path.unlink()
        config = json.loads((directory / "config.json").read_text())
        config["auto_map"] = {k: f"evil-org/evil--{v}" for k, v in config["auto_map"].items()}
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def _write_run(run: Path, cfg: XDLMConfig, model=None, tokenizer=None) -> Path:
    """A run written by the real checkpoint writer: `cfg` saved in meta.json as its config,
    `model` (default: a tiny DiT) as its weights. Returns the checkpoint directory."""
    from xdlm.data.tokenizers import load_tokenizer

    tok = tokenizer or load_tokenizer("char", corpus_texts=[_TEXT])
    if model is None:
        model = build_model(load_config(None, _TINY_DIT).model, tok.vocab_size)
    kernel = MixedKernel(model.output_head.weight.shape[0], tok.mask_id, cfg.kernel.k)
    meta = {"kernel": kernel.spec(), "schedule": schedule_spec(LogLinear()),
            "config": cfg.to_dict()}  # fmt: skip
    ckpt = save_checkpoint(run, 4, model=model, ema_state=None, train_state={}, meta=meta)
    tok.save(run / "tokenizer")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return ckpt


_TINY_DIT = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "data.seq_len=16"]


# (what the hostile file says about the model, given the hostile code directory CODE)
VARIANTS = {
    "trust-true": lambda code: {"hf_name": str(code), "trust_remote_code": True},
    "code-in-hf-dir": lambda code: {"hf_name": str(code)},
    "kind-remote-hub-id": lambda code: {"hf_name": "evil-org/evil-model", "hf_kind": "remote"},
    "relative-path-in-run": lambda code: {"hf_name": "code", "trust_remote_code": True},
    "auto-map-only": lambda code: {"hf_name": str(code)},
}


def _hostile_config(variant: str, code: Path) -> XDLMConfig:
    model = {"backbone": "hf", **VARIANTS[variant](code)}
    return load_config(None, ["data.seq_len=16", "kernel.k=0.1"] + [
        f"model.{key}={json.dumps(value)}" for key, value in model.items()
    ])  # fmt: skip


@pytest.fixture
def hostile_run(clean_code, tmp_path, monkeypatch):
    """make(variant) -> a run whose meta.json and config.yaml say `variant`; cwd is the run (the
    relative `hf_name` names code shipped inside it)."""
    marker = tmp_path / "marker"

    def make(variant: str) -> Path:
        run = tmp_path / f"run-{variant}"
        code = _hostile(clean_code, tmp_path, marker, with_code=variant != "auto-map-only")
        _write_run(run, _hostile_config(variant, code))
        shutil.copytree(code, run / "code")
        monkeypatch.chdir(run)
        return run

    make.marker = marker
    return make


COMMANDS = {
    "sample": lambda run, out: ["sample", "--ckpt", str(run), "--steps", "2"],
    "eval": lambda run, out: ["eval", "--ckpt", str(run), "--out", str(out / "e.json")],
    "export": lambda run, out: ["export", str(run), str(out / "export")],
    "images": lambda run, out: ["images", "sample", "--ckpt", str(run), "--out", str(out / "g")],
    "reproduce": lambda run, out: ["reproduce", "zero-shot", "--ckpt", str(run), "--max-rows", "1"],
    "train-resume": lambda run, out: ["train", "--resume", "--out", str(run)],
    "distill": lambda run, out: ["distill", "--teacher", str(run), "--out", str(out / "d"),
                                 "--rounds", "2", "--steps", "1"],
}  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_run_never_turns_on_its_own_code(hostile_run, tmp_path, capsys, command, variant):
    run = hostile_run(variant)
    assert main(COMMANDS[command](run, tmp_path)) == 2
    line = _error(capsys)
    assert "meta.json" in line and FLAG in line
    assert not hostile_run.marker.exists()


def test_consolidate_and_the_python_api_refuse_too(hostile_run, tmp_path, capsys):
    run = hostile_run("trust-true")
    meta_path = find_checkpoint(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "sharded": True, "world_size": 1}))
    assert main(["consolidate", str(run), "--out", str(tmp_path / "single")]) == 2
    assert "meta.json" in _error(capsys)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"meta.json.*{FLAG}"):
        load_run(run)
    assert not hostile_run.marker.exists()


@pytest.mark.parametrize("variant", ["trust-true", "code-in-hf-dir"])
def test_an_export_never_turns_on_its_own_code(hostile_run, tmp_path, capsys, variant):
    run = hostile_run(variant)
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(find_checkpoint(run) / "model.safetensors", export / "model.safetensors")
    meta = json.loads((find_checkpoint(run) / "meta.json").read_text())
    config = {"xdlm_format": 1, "config": meta["config"], "architecture": {"vocab_size": 9},
              "kernel": {**meta["kernel"], "schedule": meta["schedule"]},
              "training": {"steps": 4}}  # fmt: skip
    (export / "config.json").write_text(json.dumps(with_digest(config)))  # a well-formed export
    for command in ("sample", "eval", "reproduce"):
        assert main(COMMANDS[command](export, tmp_path)) == 2
        line = _error(capsys)
        assert "config.json" in line and FLAG in line
    assert not hostile_run.marker.exists()


def test_config_yaml_of_a_run_without_checkpoints_is_refused_on_resume(hostile_run, capsys):
    run = hostile_run("trust-true")
    shutil.rmtree(run / "checkpoints")
    assert main(["train", "--resume", "--out", str(run)]) == 2
    line = _error(capsys)
    assert "config.yaml" in line and FLAG in line
    assert not hostile_run.marker.exists()


def test_a_recipe_or_set_declaring_remote_code_needs_the_flag(hostile_run, tmp_path, capsys):
    hostile_run("trust-true")
    code = next(tmp_path.glob("llada_*"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"backbone": "hf", "hf_name": str(code),
                                                "trust_remote_code": True}}))  # fmt: skip
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "new")]) == 2
    line = _error(capsys)
    assert str(recipe) in line and FLAG in line
    argv = ["--set", "model.backbone=hf", "--set", "model.hf_name=gpt2",
            "--set", "model.trust_remote_code=true"]  # fmt: skip
    assert main(["train", "--out", str(tmp_path / "new"), *argv]) == 2
    line = _error(capsys)
    assert "--set" in line and FLAG in line
    assert not hostile_run.marker.exists() and not (tmp_path / "new").exists()


def test_the_flag_lets_a_models_own_code_run(clean_code, tmp_path, capsys):
    """The same kind of run with harmless code: refused without the flag, sampled with it (the
    marker shows the code ran), through `xdlm sample` and `load_run`."""
    from transformers import AutoConfig

    from xdlm.models.hf import HFDenoiser

    marker = tmp_path / "marker"
    code = _hostile(clean_code, tmp_path, marker)
    cfg = load_config(None, ["data.seq_len=16", "model.backbone=hf", f"model.hf_name={code}",
                             "model.trust_remote_code=true"])  # fmt: skip
    model = HFDenoiser.from_config(AutoConfig.from_pretrained(clean_code, trust_remote_code=True),
                                   trust_remote_code=True)  # fmt: skip
    run = tmp_path / "run"
    _write_run(run, cfg, model=model)
    argv = ["sample", "--ckpt", str(run), "--steps", "2", "--num-samples", "1", "--seq-len", "8"]
    assert main(argv) == 2 and FLAG in _error(capsys) and not marker.exists()
    assert main([*argv, FLAG]) == 0
    assert "1 samples, sampler=xdm" in capsys.readouterr().out and marker.exists()
    assert load_run(run, trust_remote_code=True).config.model.trust_remote_code is True


@pytest.mark.parametrize(
    "content",
    [{"trust_remote_code": True}, {"model_args": "pretrained=x,trust_remote_code=True"},
     {"model_args": {"pretrained": "x", "trust_remote_code": "true"}}],
    ids=["top-level", "model-args-string", "model-args-mapping"],
)  # fmt: skip
def test_an_lm_eval_config_file_never_turns_on_remote_code(tmp_path, capsys, content):
    pytest.importorskip("lm_eval")
    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump({"model": "xdlm", "tasks": ["arc_easy"], **content}))
    assert main(["lm-eval", "--config", str(config)]) == 2
    line = _error(capsys)
    assert str(config) in line and "trust_remote_code=True in --model_args" in line


# ---------------------------------------------------------------- settings of the invocation


@pytest.fixture
def sized_run(tiny_run, tmp_path):
    """A run on the tiny prepared data whose saved sample / eval sections ask for a billion
    steps and samples, a plot over the user's file, a scorer, a device and corpora."""
    victim = tmp_path / "victim.pdf"
    victim.write_text("the user's file")
    big = 10**9
    cfg = load_config(None, _TINY_DIT + [
        f"data.path={tiny_run / 'data'}", "data.seq_len=32",
        f"sample.steps={big}", f"sample.num_samples={big}", f"sample.seq_len={big}",
        f"sample.batch_size={big}", "sample.block_size=1", "sample.device=cuda:7",
        "sample.prompt=NEVER", "sample.sampler=ancestral", "sample.guidance=3.0",
        "sample.class_label=1", "sample.seed=7", "sample.top_p=0.5",
        "eval.gen_ppl=true", f"eval.plot={victim}", f"eval.scorer={tmp_path / 'scorer'}",
        f"eval.steps=[{big}]", f"eval.num_samples={big}", f"eval.discrete_T=[{big}]",
        f"eval.t_samples={big}", "eval.zero_shot=[/etc/passwd]", "eval.device=cuda:7",
        f"images.per_class={big}",
    ])  # fmt: skip
    tok = load_tokenizer_dir(tiny_run / "data" / "tokenizer")
    _write_run(tmp_path / "run", cfg, tokenizer=tok)
    return tmp_path / "run", victim


def test_sample_takes_no_sizes_from_the_run(sized_run, tmp_path):
    run, _ = sized_run
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--ckpt", str(run), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    s = records[0]["settings"]
    assert len(records) == 4 and (s["steps"], s["num_samples"], s["batch_size"]) == (32, 4, None)
    assert s["seq_len"] is None and len(records[0]["tokens"]) == 32  # the run's data.seq_len
    assert s["block_size"] is None and s["prompt"] is None and s["seed"] == 0
    assert (s["class_label"], s["guidance"], s["device"]) == (None, 0.0, build_device("auto"))
    assert (s["sampler"], s["top_p"]) == ("ancestral", 0.5)  # how to denoise: the run's


def test_eval_writes_no_file_the_run_names(sized_run, tmp_path):
    run, victim = sized_run
    out = tmp_path / "e.json"
    assert main(["eval", "--ckpt", str(run), "--out", str(out), "--max-batches", "1"]) == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"likelihood"} and not {"generation", "zero_shot"} & set(report)
    assert report["likelihood"]["settings"]["t_samples"] == 4
    assert report["likelihood"]["discrete"] == {}
    assert victim.read_text() == "the user's file"
    assert not (tmp_path / "scorer").exists()


def test_images_take_no_sizes_from_the_run(sized_run):
    """`xdlm images` resolves its settings like sample (its image run is not needed for that)."""
    from xdlm.cli import build_parser
    from xdlm.commands.options import command_config

    cfg = command_config(build_parser().parse_args(["images", "eval", "--ckpt", str(sized_run[0])]))
    assert (cfg.images.per_class, cfg.sample.steps, cfg.sample.guidance) == (8, 32, 0.0)


# ---------------------------------------------------------------- checkpoints/latest


@pytest.fixture
def two_runs(tiny_run, tmp_path):
    shutil.copytree(tiny_run / "run", tmp_path / "runs" / "mine")
    shutil.copytree(tiny_run / "run", tmp_path / "runs" / "other")
    return tmp_path / "runs" / "mine", tmp_path / "runs" / "other"


LATEST = {
    "absolute": lambda other: str(other / "checkpoints" / "step_0000004"),
    "dot-dot": lambda other: "../../other/checkpoints/step_0000004",
    "dot-dot-after-a-name": lambda other: "step_0000004/../../../other/checkpoints/step_0000004",
    "link-out": lambda other: "step_0000009",
    "parent": lambda other: "..",
    "huge-binary": lambda other: "\udcff" * 10**6,
}


@pytest.mark.parametrize("case", list(LATEST))
@pytest.mark.parametrize("command", ["sample", "eval", "train-resume"])
def test_latest_never_leads_out_of_checkpoints(two_runs, tmp_path, capsys, case, command):
    mine, other = two_runs
    (mine / "checkpoints" / "step_0000009").symlink_to(other / "checkpoints" / "step_0000004")
    text = LATEST[case](other) + "\n"
    (mine / "checkpoints" / "latest").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert main(COMMANDS[command](mine, tmp_path)) == 2
    line = _error(capsys)
    assert str(mine / "checkpoints" / "latest") in line and "inside" in line


def test_a_linked_step_dir_is_not_a_checkpoint(two_runs):
    mine, other = two_runs
    (mine / "checkpoints" / "latest").unlink()
    (mine / "checkpoints" / "step_0000009").symlink_to(other / "checkpoints" / "step_0000004")
    assert find_checkpoint(mine) == mine / "checkpoints" / "step_0000004"
