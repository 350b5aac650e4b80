"""scripts/gpu_session.sh with DEVICE=cpu: the lease script's train + sample path (two runs,
k = 0.1 and k = 0, T = 8 and 32 samples each, runs.tgz without weights) on the quickstart model,
3 steps, so that a GPU lease is not spent on a broken script. The CUDA-only steps (gpu_check,
gpu_llm_check, loss_bench) are skipped here; gpu_llm_check's code path has a CPU smoke test of
its own (test_scripts_gpu_llm.py)."""

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from xdlm.data.corpora import embedded_corpus_path
from xdlm.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_session_trains_samples_and_packs_both_runs(tmp_path):
    data = tmp_path / "data"
    corpus = embedded_corpus_path("austen")
    prepare([corpus], data, tokenizer="bpe", tokenizer_vocab_size=512, seq_len=64)
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {**os.environ, "DEVICE": "cpu", "CONFIG": "configs/quickstart.yaml", "DATA": str(data),
           "STEPS": "3", "OUT": str(out), "RUNS": str(runs), "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    log = (out / "session.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    samples = [f"sample-k{k}-T{T}" for k in (0.1, 0) for T in (8, 32)]
    for name in ("train-k0.1", "train-k0", *samples):
        assert f"== {name}: rc=0" in log, (name, log[-3000:])
    with tarfile.open(out / "runs.tgz") as tar:
        names = tar.getnames()
    for k in ("0.1", "0"):
        assert f"./k{k}/metrics.jsonl" in names and f"./k{k}/samples-T32.jsonl" in names
    assert not any(n.endswith(".safetensors") for n in names)
    assert "gpu-check" not in log  # the CUDA-only steps are skipped on CPU
