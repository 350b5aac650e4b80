"""FSDP2 with a Hugging Face backbone (torchrun, gloo, 2 CPU processes): 2-process == 1-process.

    python -m pytest -q -m distributed tests/test_distributed_hf.py

`wrap_model` shards each `HFDenoiser.blocks[i]` (the Llama decoder layers) and then the root
(embeddings, final norm, LM head), with activation checkpointing on every layer.
"""

import pytest
from test_distributed import worker

pytest.importorskip("transformers")


@pytest.mark.distributed
def test_fsdp_step_with_a_llama_backbone_equals_one_process(tmp_path):
    """One AdamW step (2 accumulated micro-batches per rank, clipping) of a tiny float64 Llama
    `HFDenoiser` on 2 ranks gives the parameters of one process on the concatenated batch."""
    result = worker("step-fsdp-hf", tmp_path)
    assert result["sharded"] and result["blocks_sharded"]  # root + each decoder layer
    assert result["dtypes"] == ["torch.float64"]
    assert result["moved"] > 1e-3  # the step did something
    assert result["max_diff"] < 1e-12
