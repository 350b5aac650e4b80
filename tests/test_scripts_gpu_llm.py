"""scripts/gpu_llm_check.py --cpu-smoke: the LLM-scale GPU check's code path (random Llama
`HFDenoiser`, FSDP2 on a 1-process gloo group, activation checkpointing, bf16, XDLM k = 0.1 with
unit weighting, AdamW) on a tiny CPU model for 2 timed steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_llm_check.py"
KEYS = {
    "device", "world_size", "model", "params", "dtype", "fsdp2", "activation_checkpointing",
    "mixed_precision", "fused_loss", "k", "weighting", "seq_len", "batch_per_gpu",
    "tokens_per_step", "timed_steps", "step_time_s", "tokens_per_s", "tokens_per_s_per_gpu",
    "assumed_peak_flops_per_gpu", "mfu", "max_memory_gib", "loss_first", "loss_last",
}  # fmt: skip


@pytest.mark.slow
def test_cpu_smoke_prints_the_report():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert KEYS <= set(out), KEYS - set(out)
    assert out["fsdp2"] and out["activation_checkpointing"] and not out["fused_loss"]
    assert out["k"] == 0.1 and out["weighting"] == "unit" and out["timed_steps"] == 2
    assert out["tokens_per_step"] == out["batch_per_gpu"] * out["seq_len"]
    assert out["tokens_per_s"] > 0 and out["mfu"] > 0 and out["max_memory_gib"] is None
    assert 0 < out["loss_first"] < 1e4 and 0 < out["loss_last"] < 1e4
