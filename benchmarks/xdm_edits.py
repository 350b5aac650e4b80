"""How many XDLM edits each LLaDA-style sampler makes at the paper's setting (issue 15).

    python -m benchmarks.xdm_edits [--batch 8] [--out benchmarks/results/xdm_edits.json]

Setting: a 32-token prompt, 256 generated tokens, 32 steps, k = 0.1, greedy. Variants:
`confidence` (ours: per-step budget ⌊k/(1−k)·n⌋, prompt frozen, steps per block), `xdm` (the
authors' `generate_xdm`: cumulative budget with carry-over, prompt editable), `xdm` with
`protect_prompt`; each with one block and with 4 blocks of 64 at the same 32 denoiser calls
(ours: 8 steps per block; xdm: 32 in total). Models: a deterministic fake (logits from a fixed
random table of position × left × right neighbour, as in tests/test_sampling_xdm.py) and a tiny
random-init Llama (`HFDenoiser`, bidirectional). An edit is a visible token replaced by another
(a "revised" transition of the recorded trajectory). The counts are deterministic (no timing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import RESULTS
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import LogLinear
from xdlm.precision import cpu_description
from xdlm.sampling import XDM, Confidence, cumulative_edit_budget, generate
from xdlm.sampling.steps import Fixed

PROMPT, GEN, STEPS, K = 32, 256, 32, 0.1


class TableModel:
    """Logits (B, L, V) = left[l, z_{l−1}] + right[l, z_{l+1}] from fixed random tables."""

    def __init__(self, length: int, vocab: int, mask_id: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.left = 3.0 * torch.randn(length, vocab, vocab, generator=g)
        self.right = 3.0 * torch.randn(length, vocab, vocab, generator=g)
        self.mask_id = mask_id

    def __call__(self, z, t, attention_mask=None, cond=None):
        pos = torch.arange(z.shape[1])
        left = torch.nn.functional.pad(z[:, :-1], (1, 0), value=self.mask_id)
        right = torch.nn.functional.pad(z[:, 1:], (0, 1), value=self.mask_id)
        return self.left[pos, left] + self.right[pos, right]


def tiny_llama(vocab: int):
    from transformers import LlamaConfig

    from xdlm.models.hf import HFDenoiser

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=PROMPT + GEN,
    )  # fmt: skip
    torch.manual_seed(0)
    return HFDenoiser.from_config(cfg, kind="decoder").eval()


VARIANTS = {  # name -> (sampler, block_size, steps argument)
    "confidence": (Confidence(), None, STEPS),
    "xdm": (XDM(), None, STEPS),
    "xdm_protect_prompt": (XDM(protect_prompt=True), None, STEPS),
    "confidence_4_blocks": (Confidence(), GEN // 4, STEPS // 4),
    "xdm_4_blocks": (XDM(), GEN // 4, STEPS),
}


def count_edits(model, vocab: int, batch: int) -> dict:
    """Per variant: mean edits per sequence (total, in the prompt, in the generation), NFE."""
    mask_id = vocab - 1
    kernel = MixedKernel(vocab, mask_id, K)
    prompt = torch.randint(mask_id, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(batch, PROMPT + GEN, dtype=torch.bool)
    mask[:, :PROMPT] = True
    tokens = torch.nn.functional.pad(prompt, (0, GEN))
    rows = {}
    for name, (sampler, block_size, steps) in VARIANTS.items():
        out = generate(
            model, kernel, LogLinear(), batch_size=batch, seq_len=PROMPT + GEN, steps=steps,
            generator=torch.Generator().manual_seed(0), sampler=sampler,
            fixed=Fixed(mask, tokens), block_size=block_size, record=True,
        )  # fmt: skip
        codes = out.trajectory.transitions()  # (S, B, L)
        revised = codes == 2
        per_seq = revised.sum((0, 2)).double()
        rows[name] = {
            "edits_per_sequence": per_seq.mean().item(),
            "edits_min_max": [int(per_seq.min()), int(per_seq.max())],
            "edits_in_prompt": revised[..., :PROMPT].sum().item() / batch,
            "edits_in_generation": revised[..., PROMPT:].sum().item() / batch,
            "steps_with_edits": int(revised.any(-1).any(-1).sum()),
            "nfe": out.nfe,
            "masks_left": int((out.tokens == mask_id).sum()),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "xdm_edits.json"))
    args = parser.parse_args()
    n = torch.full((1, STEPS), GEN // STEPS)
    result = {
        "setting": {"prompt": PROMPT, "gen_length": GEN, "steps": STEPS, "k": K},
        "xdm_budget_one_block": int(cumulative_edit_budget(K, n)[0, -1]),
        "fake_table_model_V64": count_edits(TableModel(PROMPT + GEN, 64, 63), 64, args.batch),
        "tiny_random_llama_V512": count_edits(tiny_llama(512), 512, args.batch),
        "machine": {"torch": torch.__version__, **cpu_description()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
