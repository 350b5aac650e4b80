"""`--device` everywhere: auto = cuda when visible, else cpu; a device this machine lacks is a
ValueError naming the fix (exit 2 with one line from the CLI), never a torch traceback."""

from __future__ import annotations

import pytest
import torch

from xdlm.builders import build_device
from xdlm.cli import main


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_cuda_when_visible_else_cpu(monkeypatch):
    _gpus(monkeypatch, 0)
    assert build_device("auto") == "cpu" and build_device("cpu") == "cpu"
    _gpus(monkeypatch, 2)
    assert build_device("auto") == "cuda"
    assert build_device("cuda:1") == "cuda:1"  # the last GPU there is


def test_devices_this_machine_lacks_are_errors(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match=r"device 'cuda' requested but this torch sees no CUDA"):
        build_device("cuda")
    _gpus(monkeypatch, 2)
    with pytest.raises(ValueError, match=r"'cuda:2' requested but only 2 CUDA GPU\(s\)"):
        build_device("cuda:2")  # one past the last
    with pytest.raises(ValueError, match=r"unknown device 'gpu'; use auto, cpu, cuda"):
        build_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_cli_says_one_line_for_cuda_on_a_cpu_only_torch(tiny_run, command, capsys):
    argv = [command, "--ckpt", str(tiny_run / "run"), "--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use --device cpu or auto" in err[0], err
