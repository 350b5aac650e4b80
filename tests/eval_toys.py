"""Tiny stand-ins shared by the tests/test_eval_*.py files: a toy denoiser and a toy scorer."""

import torch
from torch import nn

from xdlm.eval.genquality import Scorer

WORDS = "the cat sat on a mat and dog ran far away".split()


class Toy(nn.Module):
    """logits(z) = A[z] + mean_l B[z_l]: cheap, bidirectional, deterministic."""

    def __init__(self, vocab: int):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.b = nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def forward(self, z, t, attention_mask=None, cond=None):
        return self.a[z] + self.b[z].mean(1, keepdim=True)


def tiny_scorer(context: int = 64) -> Scorer:
    """A random 2-layer Llama over a word-level vocabulary (specials <s> = 0, </s> = 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=context, bos_token_id=0, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    return Scorer(LlamaForCausalLM(cfg).eval(), hf_tok, "tiny-llama", context)
