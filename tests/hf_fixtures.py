"""Offline tiny Hugging Face models and tokenizer for the HF adapter tests (no hub access).

- `tiny_tokenizer()`: a byte-level BPE trained on the embedded Austen corpus, as a
  `PreTrainedTokenizerFast` with EOS/PAD/BOS but no mask token (so `prepare_tokenizer` adds one)
  and a small chat template.
- `tiny_config(kind)`: random-init configs for Llama (decoder), BERT and ModernBERT (encoders).
- `write_remote_model(dir)`: a LLaDA-shaped model (bidirectional pre-norm transformer in HF's
  PreTrainedModel style) as config.json + configuration/modeling files for trust_remote_code.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from xdlm.data.corpora import embedded_corpus_path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@lru_cache(maxsize=1)
def austen_text(n_chars: int = 200_000) -> str:
    with gzip.open(embedded_corpus_path("austen"), "rt", encoding="utf-8") as f:
        return f.read(n_chars)


def tiny_tokenizer(vocab_size: int = 300):
    """A fresh tokenizer each call (tests mutate it by adding a mask token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<eos>", "<pad>", "<bos>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(austen_text(50_000).split("\n\n"), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(kind: str, vocab_size: int = 320, attn: str = "sdpa"):
    """kind: "llama" | "gpt2" | "bert" | "modernbert"; 2 layers, width 32."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, ModernBertConfig

    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        cfg._attn_implementation = attn
        return cfg

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64)
    common |= dict(num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        cfg = LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=128)
    elif kind == "bert":
        cfg = BertConfig(**common, max_position_embeddings=128, hidden_dropout_prob=0.0)
        cfg.attention_probs_dropout_prob = 0.0
    elif kind == "modernbert":
        cfg = ModernBertConfig(
            **common,
            max_position_embeddings=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            cls_token_id=2,
            sep_token_id=1,
        )
        cfg.global_attn_every_n_layers = 1
    else:
        raise ValueError(kind)
    cfg._attn_implementation = attn
    return cfg


_CONFIG_PY = """
from transformers import PretrainedConfig


class TinyLLaDAConfig(PretrainedConfig):
    model_type = "tiny_llada"

    def __init__(self, vocab_size=320, d_model=32, n_heads=4, n_layers=2, mlp=64, **kw):
        self.vocab_size, self.d_model, self.n_heads = vocab_size, d_model, n_heads
        self.n_layers, self.mlp = n_layers, mlp
        super().__init__(**kw)
"""

_MODELING_PY = """
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tiny_llada import TinyLLaDAConfig


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads = c.n_heads
        self.norm1, self.norm2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.qkv, self.out = nn.Linear(c.d_model, 3 * c.d_model), nn.Linear(c.d_model, c.d_model)
        self.ff = nn.Sequential(nn.Linear(c.d_model, c.mlp), nn.GELU(), nn.Linear(c.mlp, c.d_model))

    def forward(self, x, key_mask):
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.out(y.transpose(1, 2).reshape(B, L, D))
        return x + self.ff(self.norm2(x))


class TinyLLaDAModelLM(PreTrainedModel):
    config_class = TinyLLaDAConfig
    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(512, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.ff_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.ff_out

    def set_output_embeddings(self, value):
        self.ff_out = value

    def forward(self, input_ids, attention_mask=None, **kwargs):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return CausalLMOutput(logits=self.ff_out(self.ln_f(x)))
"""


def write_remote_model(directory: Path, vocab_size: int = 320) -> Path:
    """Write config.json + code files of the LLaDA-shaped model into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "configuration_tiny_llada.py").write_text(_CONFIG_PY)
    (directory / "modeling_tiny_llada.py").write_text(_MODELING_PY)
    config = {
        "model_type": "tiny_llada",
        "vocab_size": vocab_size,
        "architectures": ["TinyLLaDAModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_tiny_llada.TinyLLaDAConfig",
            "AutoModelForCausalLM": "modeling_tiny_llada.TinyLLaDAModelLM",
        },
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory
