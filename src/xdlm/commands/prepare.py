"""`xdlm prepare`: text -> fixed-length token shards with a manifest.

    xdlm prepare ../shared/data/text/austen.txt.gz --out runs/data/austen --tokenizer bpe \
        --vocab-size 2048 --seq-len 128
    xdlm prepare hf:openwebtext --out data/owt --tokenizer gpt2 --seq-len 1024     # online

Documents are streamed (memory does not grow with the corpus) and tokenized by --num-proc
worker processes; an interrupted run resumes from its last checkpoint when started again with
the same arguments (--no-resume starts over).
"""

from __future__ import annotations

import os

from xdlm.builders import resolve_sources
from xdlm.data.tokenizers import KINDS


def register(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize text into memmap shards",
        description=__doc__,
        formatter_class=_raw(),
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="files (.txt[.gz], .jsonl, .parquet), hf:NAME[:CONFIG][@SPLIT], or embedded:austen",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="gpt2", choices=KINDS, help="tokenizer kind")
    p.add_argument(
        "--tokenizer-source",
        default=None,
        help="local tokenizer files or HF name (gpt2, gpt2-mdlm, bert-base-uncased, wordpiece, hf)",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for bpe")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--mode", choices=["wrap", "pad"], default="wrap")
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--valid-docs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text", help="JSONL/parquet/HF text column")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--verify", action="store_true", help="then check it in full (as `xdlm verify DIR`)"
    )
    p.add_argument(
        "--num-proc",
        type=int,
        default=_cores(),
        help="tokenizer worker processes (default: the usable cores, %(default)s here)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (documents, tokens, MB/s, ETA on stderr)",
    )
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="discard an interrupted run's checkpoint instead of continuing it",
    )
    p.set_defaults(func=run)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def run(args) -> int:
    from xdlm.data.prepare import prepare

    m = prepare(
        resolve_sources(args.inputs),
        args.out,
        tokenizer=args.tokenizer,
        tokenizer_source=args.tokenizer_source,
        tokenizer_vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        mode=args.mode,
        valid_fraction=args.valid_fraction,
        valid_docs=args.valid_docs,
        seed=args.seed,
        text_field=args.text_field,
        overwrite=args.overwrite,
        num_proc=args.num_proc,
        resume=args.resume,
        progress=args.progress,
    )
    for name, info in m.splits.items():
        print(
            f"{name}: {info.rows} rows x {m.seq_len} tokens ({info.tokens} real tokens, "
            f"{info.documents} documents)"
        )
    print(
        f"vocab_size={m.vocab_size} mask={m.mask_id} pad={m.pad_id} bos={m.bos_id} "
        f"eos={m.eos_id} -> {args.out}"
    )
    if args.verify:
        from xdlm.data.integrity import verify_dataset

        verify_dataset(args.out)
        print(f"{args.out}: verified (sizes, sha256, every id < {m.vocab_size}, tokenizer)")
    return 0
