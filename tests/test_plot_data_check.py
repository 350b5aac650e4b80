"""`xdlm plot` warns, in one line naming the runs and the field, when the runs it draws were
trained on different data, tokenizers, vocabulary sizes or sequence lengths (issue 32.3: MDLM
on Austen at V 2048, L 64 was drawn beside XDLM on Wikipedia at V 4096, L 128)."""

from __future__ import annotations

import json
import shutil

from xdlm.cli import main
from xdlm.run_checks import with_digest
from xdlm.runs import find_checkpoint


def _copy(tiny_run, tmp_path, name: str, **data) -> str:
    """A copy of the tiny run whose latest checkpoint records other `data` fields (and
    `vocab_size` / `seq_len` in its kernel / config when given)."""
    run = tmp_path / name
    shutil.copytree(tiny_run / "run", run)
    meta_path = find_checkpoint(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["data"].update(data)
    if "vocab_size" in data:
        meta["kernel"]["vocab_size"] = data["vocab_size"]
    if "seq_len" in data:
        meta["config"]["data"]["seq_len"] = data["seq_len"]
    meta_path.write_text(json.dumps(with_digest(meta)))  # edited as a consistent run
    return str(run)


def _warnings(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("xdlm plot: warning")]


def test_runs_on_the_same_data_plot_without_warning(tiny_run, tmp_path, capsys):
    a, b = _copy(tiny_run, tmp_path, "mdlm"), _copy(tiny_run, tmp_path, "xdlm")
    assert main(["plot", a, b, "--out", str(tmp_path / "c.png")]) == 0
    assert _warnings(capsys) == [] and (tmp_path / "c.png").is_file()


def test_the_same_path_prepared_again_is_other_data(tiny_run, tmp_path, capsys):
    """Same data.path, another manifest (re-prepared): the hash tells them apart."""
    a = _copy(tiny_run, tmp_path, "mdlm")
    b = _copy(tiny_run, tmp_path, "xdlm", manifest_sha256="f" * 64)
    assert main(["plot", a, b, "--out", str(tmp_path / "c.png")]) == 0
    (line,) = _warnings(capsys)
    assert f"runs {a}, {b} differ in data " in line and "(manifest ffffffffffff) " in line
    assert "tokenizer" not in line and "vocab size" not in line


def test_vocab_size_seq_len_and_tokenizer_are_named(tiny_run, tmp_path, capsys):
    a = _copy(tiny_run, tmp_path, "mdlm")
    b = _copy(tiny_run, tmp_path, "xdlm", path="data/wiki", manifest_sha256="e" * 64,
              tokenizer_sha256="d" * 64, vocab_size=4096, seq_len=128)  # fmt: skip
    assert main(["plot", a, b, "--out", str(tmp_path / "c.png")]) == 0  # drawn all the same
    (line,) = _warnings(capsys)
    for field in ("data ", "tokenizer ", "vocab size ", "seq len "):
        assert f"; {field}" in line or f"differ in {field}" in line, field
    assert f"4096 ({b})" in line and f"128 ({b})" in line and "data/wiki" in line


def test_a_run_before_its_first_checkpoint_is_compared_by_its_config(tiny_run, tmp_path, capsys):
    a = _copy(tiny_run, tmp_path, "mdlm")
    b = tmp_path / "fresh"
    b.mkdir()
    (b / "config.yaml").write_text("data:\n  path: data/other\n  seq_len: 32\n")
    (b / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    assert main(["plot", a, str(b), "--out", str(tmp_path / "c.png")]) == 0
    (line,) = _warnings(capsys)
    assert "differ in data " in line and f"data/other ({b})" in line and "seq len" not in line
