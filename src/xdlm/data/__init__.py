"""Data: tokenizers, text -> memmap shards (`prepare`), resumable sharded loading."""

from xdlm.data.corpora import embedded_corpus_path
from xdlm.data.documents import read_documents, split_documents
from xdlm.data.integrity import verify_dataset as verify
from xdlm.data.loader import Batch, Rows, ShardedLoader, TokenShards
from xdlm.data.manifest import Manifest, SplitInfo, load_manifest
from xdlm.data.prepare import prepare, split_indices
from xdlm.data.tokenizers import TextTokenizer, load_tokenizer, load_tokenizer_dir

__all__ = [
    "Batch",
    "Manifest",
    "Rows",
    "ShardedLoader",
    "SplitInfo",
    "TextTokenizer",
    "TokenShards",
    "embedded_corpus_path",
    "load_manifest",
    "load_tokenizer",
    "load_tokenizer_dir",
    "prepare",
    "read_documents",
    "split_documents",
    "split_indices",
    "verify",
]
