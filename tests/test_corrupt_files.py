"""Corrupted and edited files through the CLI (issue 27, items 5 and 6): every file xdlm trusts,
damaged or edited one way at a time, on the real path that reads it (`xdlm train` on the data,
`--resume`, `sample`, `eval`, `verify`). Each must end in exit code 2 with exactly one line that
names the file and what is wrong: no traceback, no silent success, no code run."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from run_fixtures import rewrite_meta
from safetensors.torch import load_file, save_file

from xdlm.cli import main

CKPT = "run/checkpoints/step_0000004"


class _Payload:
    """Unpickling this would create the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _ema(w, edit) -> None:
    path = w.root / CKPT / "ema.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _optimizer_moment(w, shape) -> None:
    path = w.root / CKPT / "state.pt"
    state = torch.load(path, weights_only=True)
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(shape)
    torch.save(state, path)


def _set_k(meta) -> None:  # an edit made consistently in both places k is recorded
    meta["kernel"]["k"] = 0.5
    meta["config"]["kernel"]["k"] = 0.5


def _nan(tensors) -> None:
    tensors.update({k: torch.full_like(v, float("nan")) for k, v in tensors.items()})


# ---------------------------------------------------------------- the commands


def _train(w):  # a new run on the (corrupted) data
    return ["train", "--config", str(w.tiny / "run" / "config.yaml"), "--out", str(w.root / "new"),
            "--set", f"data.path={w.root / 'data'}", "--no-samples"]  # fmt: skip


def _resume(w):
    return ["train", "--out", str(w.root / "run"), "--resume", "--set", "train.steps=6",
            "--set", f"data.path={w.tiny / 'data'}", "--no-samples"]  # fmt: skip


def _sample(w, where="run"):
    return ["sample", "--ckpt", str(w.root / where), "--num-samples", "1", "--steps", "2",
            "--seq-len", "8"]  # fmt: skip


def _eval(w):
    return ["eval", "--ckpt", str(w.tiny / "run"), "--data", str(w.root / "data"), "--out",
            str(w.root / "eval.json"), "--max-batches", "1", "--t-samples", "1"]  # fmt: skip


def _verify(what):
    return lambda w: ["verify", str(w.root / what)]


def _hf_train(w):  # a new run with a (corrupted) Hugging Face backbone on sound data
    return ["train", "--config", str(w.tiny / "run" / "config.yaml"), "--out", str(w.root / "new"),
            "--set", f"data.path={w.tiny / 'data'}", "--set", "model.backbone=hf",
            "--set", f"model.hf_name={w.root / 'hf'}", "--no-samples"]  # fmt: skip


# ---------------------------------------------------------------- the corruptions


def _manifest(**changes):
    return lambda w: _json(w.root / "data/manifest.json", lambda m: m.update(changes))


def _write(rel: str, content: str | bytes):
    def write(w):
        path = w.root / rel
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return write


def _meta_edited(edit):  # meta.json edited, its digest left as saved
    return lambda w: _json(w.root / CKPT / "meta.json", edit)


def _meta_redigested(edit):  # ... and the digest recomputed: the checks behind it must hold
    return lambda w: rewrite_meta(w.root / CKPT, edit)


def _ema_edited(edit):
    return lambda w: _ema(w, edit)


def _weights_without_one(w) -> None:  # model.safetensors lacks one parameter
    path = w.root / CKPT / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("blocks.0.attn.qkv.weight")
    save_file(tensors, str(path))


_EMA_SHAPE_1 = _ema_edited(lambda t: t.update({"blocks.0.attn.qkv.weight": torch.zeros(1)}))
_PYTHON_TAG = "train: !!python/object/apply:os.getcwd []\n"
_BAD_SAFETENSORS = b"\x10" + b"\x00" * 7 + b"{not json}"
_M, _META, _EMA = "data/manifest.json", f"{CKPT}/meta.json", f"{CKPT}/ema.safetensors"


def _pickled(w) -> bytes:
    return pickle.dumps(_Payload(w.root / "pwned"))


def _hf_pickled_bin(w) -> None:
    (w.root / "hf/model.safetensors").unlink()
    torch.save({"w": _Payload(w.root / "pwned")}, w.root / "hf/pytorch_model.bin")


def _evil_config(w):
    return ["train", "--config", str(w.root / "evil.yaml"), "--out", str(w.root / "new")]


def _evil_set(w):
    tag = "!!python/object/apply:os.getcwd []"
    return ["train", "--out", str(w.root / "new"), "--set", f"train.steps={tag}"]


def _no_checkpoints_evil_config_yaml(w):
    shutil.rmtree(w.root / "run/checkpoints")
    (w.root / "run/config.yaml").write_text(_PYTHON_TAG)


def _sample_export(w):
    return _sample(w, "export")


def _import_dir(bad: str):
    """A HF repo directory for `xdlm import` whose `bad` file is corrupt."""

    def write(w):
        (w.root / "hfimp").mkdir()
        config = "{" if bad == "config.json" else '{"model_type": "mdlm"}'
        (w.root / "hfimp/config.json").write_text(config)
        torch.save({"w": _Payload(w.root / "pwned")}, w.root / "hfimp/pytorch_model.bin")

    return write


def _import(w):
    return ["import", str(w.root / "hfimp"), "--out", str(w.root / "imported"), "--k", "0"]


# (id, what is copied, the corruption, the command, the file named, the message)
CASES = [
    # --- item 5: fields of the manifest that the readers trust
    ("dtype-float16", "data", _manifest(dtype="float16"),
     _train, _M, r"dtype = 'float16'.*'uint16'"),
    ("dtype-int16-verify", "data", _manifest(dtype="int16"),
     _verify("data"), _M, "dtype = 'int16'"),
    ("vocab-size-raised", "data", _manifest(vocab_size=5000),
     _train, _M, "vocab_size=5000 .*tokenizer"),
    ("vocab-size-raised-verify", "data", _manifest(vocab_size=5000),
     _verify("data"), _M, "vocab_size=5000"),
    ("mask-id-ordinary", "data", _manifest(mask_id=5),
     _train, _M, "mask_id=5 but the saved tokenizer"),
    ("mask-id-ordinary-eval", "data", _manifest(mask_id=5), _eval, _M, "mask_id=5"),
    ("mask-id-ordinary-verify", "data", _manifest(mask_id=5), _verify("data"), _M, "mask_id=5"),
    ("pad-id-verify", "data", _manifest(pad_id=5), _verify("data"), _M, "pad_id=5"),
    ("mode-pad-without-lengths", "data", _manifest(mode="pad"), _train, _M, "mode='pad'"),
    # --- item 5: a run's tensors and meta.json
    ("ema-shape-1-sample", "run", _EMA_SHAPE_1,
     _sample, _EMA, r"blocks.0.attn.qkv.weight has shape \(1,\)"),
    ("ema-shape-1-resume", "run", _EMA_SHAPE_1, _resume, _EMA, r"has shape \(1,\)"),
    ("ema-shape-1-verify", "run", _EMA_SHAPE_1, _verify("run"), _EMA, r"has shape \(1,\)"),
    ("weights-missing-one-sample", "run", _weights_without_one, _sample,
     f"{CKPT}/model.safetensors", r"missing \['blocks.0.attn.qkv.weight'\]"),
    ("weights-missing-one-verify", "run", _weights_without_one, _verify("run"),
     f"{CKPT}/model.safetensors", r"missing \['blocks.0.attn.qkv.weight'\]"),
    ("ema-nan-resume", "run", _ema_edited(_nan), _resume, _EMA, "holds non-finite"),
    ("ema-nan-verify", "run", _ema_edited(_nan), _verify("run"), _EMA, "holds non-finite"),
    ("k-consistent-sample", "run", _meta_edited(_set_k),
     _sample, _META, "config_sha256 does not match"),
    ("k-consistent-resume", "run", _meta_edited(_set_k),
     _resume, _META, "config_sha256 does not match"),
    ("k-consistent-verify", "run", _meta_edited(_set_k),
     _verify("run"), _META, "config_sha256 does not"),
    # --- item 6: files that are not what they claim
    ("manifest-not-json", "data", _write(_M, "{"), _train, _M, "is not valid JSON"),
    ("manifest-missing-key", "data", lambda w: _json(w.root / _M, lambda m: m.pop("seq_len")),
     _verify("data"), _M, "'seq_len' is missing"),
    ("manifest-wrong-type", "data", _manifest(splits=[]), _eval, _M, "splits must be dict"),
    ("data-tokenizer-json-emptied", "data", _write("data/tokenizer/tokenizer.json", ""), _train,
     "data/tokenizer/tokenizer.json", "not a tokenizers JSON file"),
    ("meta-not-json", "run", _write(_META, "{"), _sample, _META, "is not valid JSON"),
    ("meta-missing-kernel", "run", _meta_redigested(lambda m: m.pop("kernel")), _sample, _META,
     "'kernel' is missing"),
    ("meta-kernel-wrong-type", "run", _meta_redigested(lambda m: m["kernel"].update(k="half")),
     _resume, _META, "k must be float"),
    ("meta-k-out-of-range", "run", _meta_redigested(lambda m: m["kernel"].update(k=1.5)),
     _sample, _META, r"kernel .* is not valid"),
    ("meta-schedule-unknown", "run", _meta_redigested(lambda m: m.update(schedule={"name": "x"})),
     _sample, _META, r"schedule .* is not valid"),
    ("meta-config-wrong-type", "run", _meta_redigested(lambda m: m["config"]["model"].update(
        n_layers="two")), _sample, _META, "n_layers"),
    ("run-tokenizer-json-pickled", "run", lambda w: _write("run/tokenizer/tokenizer.json",
        _pickled(w))(w), _sample, "run/tokenizer/tokenizer.json", "not a tokenizers JSON file"),
    ("run-tokenizer-json-emptied", "run", _write("run/tokenizer/tokenizer.json", ""), _sample,
     "run/tokenizer/tokenizer.json", "not a tokenizers JSON file"),
    ("xdlm-tokenizer-json-emptied", "run", _write("run/tokenizer/xdlm_tokenizer.json", ""),
     _sample, "run/tokenizer/xdlm_tokenizer.json", "is not valid JSON"),
    ("xdlm-tokenizer-json-no-roles", "run", _write("run/tokenizer/xdlm_tokenizer.json",
        '{"special_tokens": {}, "spec": {}}'), _sample, "run/tokenizer/xdlm_tokenizer.json",
     "'bos' is missing"),
    ("config-yaml-python-tag", "run", _no_checkpoints_evil_config_yaml, _resume,
     "run/config.yaml", "is not plain YAML"),
    ("config-flag-python-tag", "run", _write("evil.yaml", _PYTHON_TAG), _evil_config, "evil.yaml",
     "is not plain YAML"),
    ("set-python-tag", "run", lambda w: None, _evil_set, "--set", "is not plain YAML"),
    ("optimizer-wrong-shape-resume", "run", lambda w: _optimizer_moment(w, (3,)), _resume,
     f"{CKPT}/state.pt", r"optimizer state exp_avg of parameter 0 has shape \(3,\)"),
    ("optimizer-wrong-shape-verify", "run", lambda w: _optimizer_moment(w, (3,)),
     _verify("run"), f"{CKPT}/state.pt", "has shape"),
    ("state-pt-emptied", "run", _write(f"{CKPT}/state.pt", b""), _resume, f"{CKPT}/state.pt",
     "is truncated or corrupt"),
    ("metrics-jsonl-plot", "run", _write("run/metrics.jsonl", "{oops\n"), lambda w: [
        "plot", str(w.root / "run"), "--out", str(w.root / "c.png")], "run/metrics.jsonl:1",
     "is not valid JSON"),
    ("eval-json-export", "run", _write("run/eval.json", "[]"), lambda w: [
        "export", str(w.root / "run"), str(w.root / "exp")], "run/eval.json", "JSON list"),
    ("import-pickled-bin", "run", _import_dir("pytorch_model.bin"), _import,
     "hfimp/pytorch_model.bin", "not a file of plain tensors"),
    ("import-config-not-json", "run", _import_dir("config.json"), _import, "hfimp/config.json",
     "is not valid JSON"),
    # --- exports (xdlm export) and Hugging Face model directories
    ("export-config-not-json", "export", _write("export/config.json", "{"), _sample_export,
     "export/config.json", "is not valid JSON"),
    ("export-k-edited", "export", lambda w: _json(w.root / "export/config.json", _set_k),
     _sample_export, "export/config.json", "config_sha256 does not match"),
    ("export-weights-malformed", "export", _write("export/model.safetensors", _BAD_SAFETENSORS),
     _verify("export"), "export/model.safetensors", "truncated or corrupt"),
    ("export-tokenizer-json-emptied", "export", _write("export/tokenizer.json", ""),
     _sample_export, "export/tokenizer.json", "not a tokenizers JSON file"),
    ("hf-pickled-bin", "hf", _hf_pickled_bin, _hf_train, "hf",
     "pytorch_model.bin is not a file of plain tensors"),
    ("hf-malformed-safetensors", "hf", _write("hf/model.safetensors", _BAD_SAFETENSORS),
     _hf_train, "hf", "SafetensorError"),
    ("hf-config-not-json", "hf", _write("hf/config.json", "{"), _hf_train, "hf",
     "not a valid JSON file"),
]  # fmt: skip


@pytest.fixture(scope="module")
def sources(tiny_run, tmp_path_factory):
    """Read-only originals: the tiny run and data, an export of the run, a tiny HF model dir
    (built on first use)."""
    from xdlm.hub import export_run

    root = tmp_path_factory.mktemp("sources")
    export_run(tiny_run / "run", root / "export")
    built = {}

    def hf_dir() -> Path:
        if not built:
            pytest.importorskip("transformers")
            from hf_fixtures import tiny_config
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(root / "hf")
            built["hf"] = root / "hf"
        return built["hf"]

    return SimpleNamespace(tiny=tiny_run, export=root / "export", hf=hf_dir)


@pytest.mark.parametrize(
    ("copied", "corrupt", "command", "named", "pattern"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_corrupt_file_is_one_line_naming_it(
    sources, tmp_path, capsys, copied, corrupt, command, named, pattern
):
    import re

    origin = {"data": sources.tiny / "data", "run": sources.tiny / "run",
              "export": sources.export}.get(copied) or sources.hf()  # fmt: skip
    shutil.copytree(origin, tmp_path / copied)
    w = SimpleNamespace(root=tmp_path, tiny=sources.tiny)
    corrupt(w)
    capsys.readouterr()
    code = main(command(w))
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("xdlm ")]
    assert code == 2 and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and errors[0].startswith(f"xdlm {command(w)[0]}: error: "), stderr
    where = named if named == "--set" else str(tmp_path / named)
    assert where in errors[0] and re.search(pattern, errors[0]), errors[0]
    assert not (tmp_path / "pwned").exists()


def test_a_sound_run_data_and_export_verify(sources, capsys):
    """The checks that refuse the corruptions above accept what xdlm writes."""
    args = ["verify", str(sources.tiny / "data"), str(sources.tiny / "run"), str(sources.export)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 checkpoint(s) step_0000002, step_0000004" in out and out.count(": OK (") == 3
