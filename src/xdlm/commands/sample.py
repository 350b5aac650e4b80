"""`xdlm sample`: few-step generation from a trained run (EMA weights by default).

    xdlm sample --ckpt runs/quickstart --steps 32 --num-samples 4
    xdlm sample --ckpt RUN --sampler remdm --remdm-eta 0.02 --final greedy        (k = 0 runs)
    xdlm sample --ckpt HF_RUN --steps 32 --prompt "def add(a, b):"  (HF runs: the xdm sampler)
    xdlm sample --ckpt RUN --sampler confidence --steps 32                    (our LLaDA variant)
    xdlm sample --ckpt RUN --prompt "It is a truth" --top-p 0.9 --out s.jsonl --trace s.html
    xdlm sample --ckpt RUN --infill "Mr. [BLANK] said [BLANK:3] to her."           (infilling)
    xdlm sample --ckpt RUN --seq-len 512 --block-size 64                           (semi-AR)
    xdlm sample --ckpt RUN --class-label 3 --guidance 1.5                  (class-conditional)

`--sampler` defaults to `xdm` (the authors' LLaDA-XDLM algorithm, greedy; `--steps` in total
over the blocks) for HF backbones (LLaDA-style models) and to `ancestral` for the native DiT.
Infilling: each `[BLANK]` marks `--blank-len` free tokens, `[BLANK:n]` marks n; the text between
blanks is fixed. `--prompt` and `--infill` texts are prefixed with the tokenizer's BOS (documents
start with BOS in prepared data). Output: one JSON object per sample (`--out`) with text, tokens,
settings, seed, NFE and wall time; `--trace` writes the first sample's trajectory as HTML.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from xdlm.precision import add_precision_argument, inference_precision
from xdlm.sampling import (
    SAMPLERS,
    LogitFilter,
    fixed_from_template,
    generate,
    make_sampler,
    parse_infill,
    write_trace_html,
)
from xdlm.sampling.steps import FINAL_MODES, GRIDS
from xdlm.sampling.xdm import REMASKING


@dataclass(frozen=True)
class SampleRequest:
    """Every setting of one `xdlm sample` call (recorded in each JSONL line)."""

    steps: int = 32
    num_samples: int = 4
    seq_len: int | None = None  # default: the training length
    sampler: str | None = None  # default: "xdm" for HF backbones, "ancestral" otherwise
    final: str = "ancestral"
    grid: str = "t"
    temperature: float | None = None  # default: 0 (greedy) for xdm, 1 otherwise
    top_k: int | None = None
    top_p: float | None = None
    remdm_eta: float = 0.01
    remdm_strategy: str = "cap"
    xdm_remasking: str = "low_confidence"
    xdm_protect_prompt: bool = False
    prompt: str | None = None
    infill: str | None = None
    blank_len: int = 8
    block_size: int | None = None
    class_label: int | None = None
    guidance: float = 0.0
    seed: int = 0
    batch_size: int | None = None  # default: num_samples
    use_ema: bool = True
    device: str = "cpu"
    precision: str = "auto"


def register(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate samples from a trained run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, metavar="RUN_DIR", help="run or checkpoint dir")
    p.add_argument(
        "--steps", type=int, default=32, help="T steps per block (xdm: in total, split over blocks)"
    )
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default: the training length")
    p.add_argument(
        "--sampler", choices=sorted(SAMPLERS), default=None,
        help="default: xdm for HF backbones (LLaDA-style), ancestral for the DiT",
    )  # fmt: skip
    p.add_argument("--final", choices=FINAL_MODES, default="ancestral", help="noise removal")
    p.add_argument("--grid", choices=GRIDS, default="t", help="uniform in t or in alpha_t")
    p.add_argument("--temperature", type=float, default=None, help="default: 0 for xdm, else 1")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--remdm-eta", type=float, default=0.01, help="ReMDM eta (remdm only)")
    p.add_argument("--remdm-strategy", choices=("cap", "rescale"), default="cap")
    p.add_argument("--xdm-remasking", choices=REMASKING, default="low_confidence")
    p.add_argument(
        "--xdm-protect-prompt", action="store_true", help="xdm: never edit prompt/fixed tokens"
    )
    p.add_argument("--prompt", default=None, help="text prefix kept fixed")
    p.add_argument("--infill", default=None, help="text with [BLANK] / [BLANK:n] gaps to fill")
    p.add_argument("--blank-len", type=int, default=8, help="tokens per plain [BLANK]")
    p.add_argument("--block-size", type=int, default=None, help="semi-AR block length")
    p.add_argument("--class-label", type=int, default=None, help="class id (conditional models)")
    p.add_argument("--guidance", type=float, default=0.0, help="CFG scale w (0 = unguided)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="default: --num-samples")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="write samples as JSONL")
    p.add_argument("--trace", default=None, metavar="FILE.html", help="trajectory of sample 0")
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    add_precision_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    fields = {f.name for f in dataclasses.fields(SampleRequest)} - {"use_ema"}
    request = SampleRequest(use_ema=not args.no_ema, **{k: getattr(args, k) for k in fields})
    sample_from_run(args.ckpt, request, out=args.out, trace=args.trace)
    return 0


def sample_from_run(
    run_dir: str | Path,
    request: SampleRequest | None = None,
    *,
    out: str | Path | None = None,
    trace: str | Path | None = None,
    **settings,
) -> list[dict]:
    """Load `run_dir`, sample, print, optionally write JSONL / HTML; returns the records.

    `settings` override fields of `request` (e.g. `sample_from_run(run, steps=8, num_samples=2)`).
    """
    from xdlm.runs import load_run

    req = dataclasses.replace(request or SampleRequest(), **settings)
    loaded = load_run(run_dir, device=req.device, use_ema=req.use_ema)
    req = _resolve_defaults(req, loaded)
    seq_len = req.seq_len or loaded.config.data.seq_len
    batch = req.batch_size or req.num_samples
    gen = torch.Generator(req.device).manual_seed(req.seed)
    sampler, records, first = _sampler(req), [], None
    precision = inference_precision(req.precision, req.device, loaded.model)
    for start in range(0, req.num_samples, batch):
        n = min(batch, req.num_samples - start)
        with precision.autocast(req.device):
            result = _generate_batch(req, loaded, sampler, n, seq_len, gen, trace is not None)
        first = result if first is None else first
        records += [_record(req, loaded, result, i, start) for i in range(n)]
    _report(records, req, final=req.final if sampler.uses_final_step else "none")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(json.dumps(r) + "\n" for r in records))
    if trace is not None:
        write_trace_html(first.trajectory, _token_text(loaded.tokenizer), trace)
        print(f"trace of sample 0 written to {trace}")
    return records


def _generate_batch(req: SampleRequest, loaded, sampler, n: int, seq_len: int, gen, record: bool):
    """One batch of `n` samples of length `seq_len`."""
    return generate(
        loaded.model, loaded.kernel, loaded.schedule, batch_size=n, seq_len=seq_len,
        steps=req.steps, generator=gen, sampler=sampler, filter=_filter(req),
        final=req.final, grid=req.grid, fixed=_fixed(req, loaded.tokenizer, n, seq_len),
        block_size=req.block_size, context_len=loaded.config.data.seq_len,
        class_labels=_labels(req, n), guidance=req.guidance, record=record,
        cache=not loaded.config.model.time_conditioning, device=req.device,
    )  # fmt: skip


def _resolve_defaults(req: SampleRequest, loaded) -> SampleRequest:
    """The request with the model-dependent defaults filled in: sampler, then temperature."""
    if req.sampler is None:
        llada_style = loaded.config.model.backbone == "hf" and loaded.kernel.mask_id is not None
        req = dataclasses.replace(req, sampler="xdm" if llada_style else "ancestral")
    if req.temperature is None:
        req = dataclasses.replace(req, temperature=0.0 if req.sampler == "xdm" else 1.0)
    if req.sampler == "xdm" and loaded.config.model.time_conditioning:
        raise ValueError("the xdm sampler calls the model without t; pick --sampler ancestral")
    return req


def _sampler(req: SampleRequest):
    if req.sampler == "remdm":
        return make_sampler("remdm", eta=req.remdm_eta, strategy=req.remdm_strategy)
    if req.sampler == "xdm":
        return make_sampler(
            "xdm", temperature=req.temperature, remasking=req.xdm_remasking,
            protect_prompt=req.xdm_protect_prompt,
        )  # fmt: skip
    return make_sampler(req.sampler)


def _filter(req: SampleRequest) -> LogitFilter:
    if req.sampler != "xdm":
        return LogitFilter(req.temperature, req.top_k, req.top_p)
    if req.top_k is not None or req.top_p is not None:
        raise ValueError(
            "--top-k/--top-p do not apply to the xdm sampler (greedy or --temperature)"
        )
    return LogitFilter()


def _fixed(req: SampleRequest, tokenizer, batch: int, seq_len: int):
    """The prompt / infilling template as `Fixed` (B, L), or None."""
    if req.prompt is None and req.infill is None:
        return None
    if req.prompt is not None and req.infill is not None:
        raise ValueError("pass either --prompt or --infill, not both")
    if tokenizer is None:
        raise ValueError("--prompt/--infill need a text model (this run has no tokenizer)")
    if req.prompt is not None:
        template = [tokenizer.bos_id, *tokenizer.encode(req.prompt)]
    else:
        template = [tokenizer.bos_id, *parse_infill(req.infill, tokenizer.encode, req.blank_len)]
    return fixed_from_template(template, batch, seq_len, req.device)


def _labels(req: SampleRequest, batch: int) -> torch.Tensor | None:
    if req.class_label is None:
        if req.guidance != 0.0:
            raise ValueError("--guidance needs --class-label")
        return None
    return torch.full((batch,), req.class_label, dtype=torch.long, device=req.device)


def _token_text(tokenizer):
    if tokenizer is None:
        return lambda ids: " ".join(str(i) for i in ids)
    return lambda ids: tokenizer.decode(ids, skip_special=False)


def _record(req: SampleRequest, loaded, result, i: int, start: int) -> dict:
    """One JSONL line: sample `start + i` of the batch starting at `start`."""
    tokens = result.tokens[i].tolist()
    text = loaded.tokenizer.decode(tokens) if loaded.tokenizer is not None else None
    return {
        "index": start + i,
        "batch_start": start,
        "text": text,
        "tokens": tokens,
        "settings": dataclasses.asdict(req),
        "seed": req.seed,
        "nfe": result.nfe,  # of the whole batch
        "wall_time_s": round(result.wall_time, 4),
        "checkpoint_step": loaded.step,
        "kernel_k": loaded.kernel.k,
    }


def _report(records: list[dict], req: SampleRequest, final: str) -> None:
    for r in records:
        body = r["text"] if r["text"] is not None else " ".join(map(str, r["tokens"]))
        print(f"--- sample {r['index']} ---\n{body}")
    batches = {r["batch_start"]: r for r in records}.values()
    nfe = sum(r["nfe"] for r in batches)
    wall = sum(r["wall_time_s"] for r in batches)
    print(
        f"{len(records)} samples, sampler={req.sampler}, steps={req.steps}, final={final}: "
        f"{nfe} denoiser calls (NFE) in {len(batches)} batch(es), {wall:.2f} s wall"
    )
