"""`xdlm sample`: few-step generation from a trained run (EMA weights by default).

    xdlm sample --ckpt runs/quickstart --steps 32 --num-samples 4
    xdlm sample --ckpt runs/quickstart --set sample.steps=8 --set sample.top_p=0.9    (same schema)
    xdlm sample --ckpt runs/quickstart --config my_sampling.yaml         (a `sample:` section)
    xdlm sample --ckpt RUN --sampler remdm --remdm-eta 0.02 --final greedy        (k = 0 runs)
    xdlm sample --ckpt HF_RUN --steps 32 --prompt "def add(a, b):"  (HF runs: the xdm sampler)
    xdlm sample --ckpt RUN --sampler confidence --steps 32                    (our LLaDA variant)
    xdlm sample --ckpt RUN --prompt "It is a truth" --top-p 0.9 --out s.jsonl --trace s.html
    xdlm sample --ckpt RUN --infill "Mr. [BLANK] said [BLANK:3] to her."           (infilling)
    xdlm sample --ckpt RUN --seq-len 512 --block-size 64                           (semi-AR)
    xdlm sample --ckpt RUN --class-label 3 --guidance 1.5                  (class-conditional)

Settings: the `sample` section of the config schema (`xdlm.config.SampleConfig`, defaults there
only), starting from the run's saved config less the invocation's settings (`xdlm.invocation`:
the run's sampler choice carries over, its steps, sizes, prompt, seed and device do not); each
flag is a shorthand for one key (shown in `--help`), and `--config` / `--set` change any key
with the same type checks as `xdlm train`. `--trust-remote-code` lets a model with Python code
of its own (an HF backbone shipping modeling_*.py) load; nothing in the run's files does.
`sample.sampler` unset (the default) means `xdm` (the authors' LLaDA-XDLM algorithm, greedy;
`--steps` in total over the blocks) for HF backbones (LLaDA-style models) and `ancestral` for
the native DiT; `sample.temperature` unset means 0 for xdm, 1 otherwise.

Infilling: each `[BLANK]` marks `--blank-len` free tokens, `[BLANK:n]` marks n; the text between
blanks is fixed. `--prompt` and `--infill` texts are prefixed with the tokenizer's BOS (documents
start with BOS in prepared data). Output: one JSON object per sample (`--out`) with text, tokens,
settings, seed, NFE and wall time, written batch by batch as they finish (at most 64 samples
per batch unless `--batch-size`; Ctrl-C keeps the finished ones and exits with 130); `--trace`
writes the first sample's trajectory as HTML.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from xdlm.builders import build_device, build_sampler, resolve_sampling
from xdlm.commands.options import (
    add_config_arguments,
    add_trust_argument,
    command_config,
    shorthand,
)
from xdlm.config import SampleConfig, XDLMConfig, choices, merge, validate
from xdlm.precision import inference_precision
from xdlm.sampling import fixed_from_template, generate, parse_infill, write_trace_html

DEFAULT_BATCH = 64  # samples per batch unless --batch-size: memory stays bounded


def register(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate samples from a trained run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, metavar="RUN_DIR", help="run or checkpoint dir")
    add_config_arguments(p, "sample")
    add_trust_argument(p)
    S = "sample."
    shorthand(p, "--steps", key=S + "steps", type=int,
              help="T steps per block (xdm: in total, split over blocks)")  # fmt: skip
    shorthand(p, "--num-samples", key=S + "num_samples", type=int)
    shorthand(p, "--seq-len", key=S + "seq_len", type=int, help="default: the training length")
    shorthand(p, "--sampler", key=S + "sampler", choices=choices(SampleConfig, "sampler"),
              help="default: xdm for HF (LLaDA-style) runs, ancestral for the DiT")  # fmt: skip
    shorthand(p, "--final", key=S + "final", choices=choices(SampleConfig, "final"),
              help="noise removal")  # fmt: skip
    shorthand(p, "--grid", key=S + "grid", choices=choices(SampleConfig, "grid"),
              help="uniform in t or alpha_t")  # fmt: skip
    shorthand(p, "--t-end", key=S + "t_end", type=float,
              help="last grid time (0.25: the final step reveals and revises)")  # fmt: skip
    shorthand(p, "--temperature", key=S + "temperature", type=float,
              help="default: 0 for xdm, else 1")  # fmt: skip
    shorthand(p, "--top-k", key=S + "top_k", type=int)
    shorthand(p, "--top-p", key=S + "top_p", type=float)
    shorthand(p, "--remdm-eta", key=S + "remdm_eta", type=float, help="ReMDM eta (remdm only)")
    shorthand(p, "--pc-eta", key=S + "pc_eta", type=float, help="corrector level (pc only)")
    shorthand(p, "--threshold", key=S + "threshold", type=float,
              help="reveal confidence (threshold only)")  # fmt: skip
    shorthand(p, "--remdm-strategy", key=S + "remdm_strategy",
              choices=choices(SampleConfig, "remdm_strategy"))  # fmt: skip
    shorthand(p, "--xdm-remasking", key=S + "xdm_remasking",
              choices=choices(SampleConfig, "xdm_remasking"))  # fmt: skip
    shorthand(p, "--xdm-protect-prompt", key=S + "xdm_protect_prompt", action="store_true",
              help="xdm: never edit prompt/fixed tokens")  # fmt: skip
    shorthand(p, "--xdm-rank-dtype", key=S + "xdm_rank_dtype",
              choices=choices(SampleConfig, "xdm_rank_dtype"),
              help="xdm ranking: logits (the authors', default) or float64")  # fmt: skip
    shorthand(p, "--prompt", key=S + "prompt", help="text prefix kept fixed")
    shorthand(p, "--infill", key=S + "infill", help="text with [BLANK] / [BLANK:n] gaps to fill")
    shorthand(p, "--blank-len", key=S + "blank_len", type=int, help="tokens per plain [BLANK]")
    shorthand(p, "--block-size", key=S + "block_size", type=int, help="semi-AR block length")
    shorthand(p, "--class-label", key=S + "class_label", type=int, help="conditional models")
    shorthand(p, "--guidance", key=S + "guidance", type=float, help="CFG scale w (0 = unguided)")
    shorthand(p, "--seed", key=S + "seed", type=int)
    shorthand(p, "--batch-size", key=S + "batch_size", type=int,
              help=f"default: min(--num-samples, {DEFAULT_BATCH})")  # fmt: skip
    shorthand(p, "--no-ema", key=S + "use_ema", action="store_false", help="raw (non-EMA) weights")
    shorthand(p, "--device", key=S + "device", help="auto, cpu, cuda, cuda:1, mps ...")
    shorthand(p, "--precision", key=S + "precision", choices=choices(SampleConfig, "precision"),
              help="autocast")  # fmt: skip
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="write samples as JSONL")
    p.add_argument("--trace", default=None, metavar="FILE.html", help="trajectory of sample 0")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        sample_from_run(
            args.ckpt, command_config(args).sample, out=args.out, trace=args.trace,
            trust_remote_code=args.trust_remote_code,
        )  # fmt: skip
    except KeyboardInterrupt:
        return 130
    return 0


def sample_from_run(
    run_dir: str | Path,
    settings: SampleConfig | None = None,
    *,
    out: str | Path | None = None,
    trace: str | Path | None = None,
    trust_remote_code: bool = False,
    **overrides,
) -> list[dict]:
    """Load `run_dir`, sample, print, optionally write JSONL / HTML; returns the records.

    `settings` default to the run's saved `sample` section less its invocation-owned settings
    (`xdlm.invocation`); `overrides` change single keys with the schema's type checks (e.g.
    `sample_from_run(run, steps=8, num_samples=2)`). `trust_remote_code`: the user's
    `--trust-remote-code` (`xdlm.runs.load_run`).
    """
    from xdlm import runs
    from xdlm.invocation import invocation_defaults

    if settings is None:
        settings = invocation_defaults(runs.read_run_config(run_dir, trust_remote_code)).sample
    s = merge(settings, overrides, "sample.")
    _check(s)
    device = build_device(s.device)
    s = dataclasses.replace(s, device=device)  # records name the device actually used
    loaded = runs.load_run(
        run_dir, device=device, use_ema=s.use_ema, trust_remote_code=trust_remote_code
    )
    s = resolve_sampling(s, loaded.config.model, loaded.kernel.mask_id)
    seq_len = s.seq_len or loaded.config.data.seq_len
    batch = s.batch_size or min(s.num_samples, DEFAULT_BATCH)
    gen = torch.Generator(device).manual_seed(s.seed)
    plan, records, first = build_sampler(s), [], None
    precision = inference_precision(
        s.precision, device, loaded.model, batch, seq_len, loaded.kernel.vocab_size
    )
    sink = _open_sink(out)
    try:
        for start in range(0, s.num_samples, batch):
            n = min(batch, s.num_samples - start)
            with precision.autocast(device):
                result = generate(
                    loaded.model, loaded.kernel, loaded.schedule, batch_size=n, seq_len=seq_len,
                    steps=s.steps, generator=gen, **plan.generate_kwargs(),
                    fixed=_fixed(s, loaded.tokenizer, n, seq_len, device),
                    block_size=s.block_size, context_len=loaded.config.data.seq_len,
                    class_labels=_labels(s, n, device), guidance=s.guidance,
                    record=trace is not None, cache=not loaded.config.model.time_conditioning,
                    device=device,
                )  # fmt: skip
            first = result if first is None else first
            done = [_record(s, loaded, result, i, start) for i in range(n)]
            _stream(done, sink)
            records += done
    except KeyboardInterrupt:
        where = f"; they are in {out}" if out is not None else ""
        print(f"\ninterrupted: {len(records)} of {s.num_samples} samples finished{where}")
        raise
    finally:
        if sink is not None:
            sink.close()
    _report(records, s, final=s.final if plan.sampler.uses_final_step else "none")
    if trace is not None:
        write_trace_html(first.trajectory, _token_text(loaded.tokenizer), trace)
        print(f"trace of sample 0 written to {trace}")
    return records


def _check(s: SampleConfig) -> None:
    """The `sample` section's ranges (`config.validate`), and at least one sample."""
    validate(XDLMConfig(sample=s))
    if s.num_samples < 1:
        raise ValueError(f"sample.num_samples (--num-samples) must be >= 1, got {s.num_samples}")


def _open_sink(out: str | Path | None):
    if out is None:
        return None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return open(out, "w")


def _stream(records: list[dict], sink) -> None:
    """Print a finished batch and append it to the JSONL output at once (a Ctrl-C later keeps
    every finished sample)."""
    for r in records:
        body = r["text"] if r["text"] is not None else " ".join(map(str, r["tokens"]))
        print(f"--- sample {r['index']} ---\n{body}", flush=True)
    if sink is not None:
        sink.write("".join(json.dumps(r) + "\n" for r in records))
        sink.flush()


def _fixed(s: SampleConfig, tokenizer, batch: int, seq_len: int, device: str):
    """The prompt / infilling template as `Fixed` (B, L), or None."""
    if s.prompt is None and s.infill is None:
        return None
    if s.prompt is not None and s.infill is not None:
        raise ValueError("set sample.prompt (--prompt) or sample.infill (--infill), not both")
    if tokenizer is None:
        raise ValueError("--prompt/--infill need a text model (this run has no tokenizer)")
    if s.prompt is not None:
        template = [tokenizer.bos_id, *tokenizer.encode(s.prompt)]
    else:
        template = [tokenizer.bos_id, *parse_infill(s.infill, tokenizer.encode, s.blank_len)]
    return fixed_from_template(template, batch, seq_len, device)


def _labels(s: SampleConfig, batch: int, device: str) -> torch.Tensor | None:
    if s.class_label is None:
        if s.guidance != 0.0:
            raise ValueError("--guidance (sample.guidance) needs --class-label (class_label)")
        return None
    return torch.full((batch,), s.class_label, dtype=torch.long, device=device)


def _token_text(tokenizer):
    if tokenizer is None:
        return lambda ids: " ".join(str(i) for i in ids)
    return lambda ids: tokenizer.decode(ids, skip_special=False)


def _record(s: SampleConfig, loaded, result, i: int, start: int) -> dict:
    """One JSONL line: sample `start + i` of the batch starting at `start`."""
    tokens = result.tokens[i].tolist()
    text = loaded.tokenizer.decode(tokens) if loaded.tokenizer is not None else None
    return {
        "index": start + i,
        "batch_start": start,
        "text": text,
        "tokens": tokens,
        "settings": dataclasses.asdict(s),
        "seed": s.seed,
        "nfe": result.nfe,  # of the whole batch
        "wall_time_s": round(result.wall_time, 4),
        "checkpoint_step": loaded.step,
        "kernel_k": loaded.kernel.k,
    }


def _report(records: list[dict], s: SampleConfig, final: str) -> None:
    batches = {r["batch_start"]: r for r in records}.values()
    nfe = sum(r["nfe"] for r in batches)
    wall = sum(r["wall_time_s"] for r in batches)
    print(
        f"{len(records)} samples, sampler={s.sampler}, steps={s.steps}, final={final}: "
        f"{nfe} denoiser calls (NFE) in {len(batches)} batch(es), {wall:.2f} s wall"
    )
