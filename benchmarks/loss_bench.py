"""Loss forward+backward from hidden states: time and peak memory, each case in a fresh process.

Cases, all from h (B, L, D) through a head W (V, D) to a summed loss, gradients into h and W:
  ce               plain cross-entropy on materialised logits (the MDLM loss; the floor)
  torch_flce       `torch.nn.functional.linear_cross_entropy` with chunking options (PyTorch's
                   own fused linear + CE; optional, skipped where this torch lacks it)
  liger_flce, cce  Liger's FLCE and Cut Cross-Entropy (CUDA only; optional imports)
  naive            BASELINE `benchmarks.naive.naive_nelbo` (dense one-hots, as reference code
                   does; checked to give the same ℓ as the kernel)
  unfused          `MixedKernel.nelbo` on the logits
  fused            `fused_nelbo` (gradients computed in forward, backward scales them)
  fused_recompute  `fused_nelbo(recompute=True)` (backward recomputes the logits)

`python -m benchmarks.loss_bench all [--quick] [--docs]` runs every case REPEATS (3) times, each
time in a fresh process (`python -m benchmarks.loss_bench CASE V B L [DEVICE]`): inputs, then for
the fused cases warm-up calls until the chunk probe has settled, then one timed call. Reported:
the median over the processes. Peak memory is the extra over the inputs: on CPU VmHWM after
resetting the high-water mark (/proc/self/clear_refs) once the inputs exist, minus VmRSS then;
on CUDA `max_memory_allocated` minus the allocation after the inputs. JSON:
benchmarks/results/loss.json (loss_quick.json with --quick); `python -m benchmarks.loss_bench
render` rewrites the docs table from loss.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.naive import naive_nelbo
from xdlm.core import fused_plan
from xdlm.core.fused import fused_nelbo
from xdlm.core.kernel import MixedKernel

D, K = 768, 0.1
NAIVE_MAX_ELEMENTS = 6.5e7  # naive needs ~20 dense (N, V) float32 tensors: skip beyond this
CASES = ("ce", "torch_flce", "liger_flce", "cce", "naive", "unfused", "fused", "fused_recompute")
MAX_WARMUP = 8
WARMUP = ("torch_flce", "liger_flce", "cce", "fused", "fused_recompute")  # compile/probe first


def make_inputs(V: int, B: int, L: int, device: str = "cpu", seed: int = 0) -> dict:
    """h (B, L, D), W (V, D) leaves; x0, z_t (B, L); α, α' (B,); the k = 0.1 kernel."""
    g = torch.Generator().manual_seed(seed)
    kernel = MixedKernel(V, V - 1, K)
    x0 = torch.randint(V - 1, (B, L), generator=g)
    alpha = torch.rand(B, generator=g) * 0.9 + 0.05
    z = kernel.sample_marginal(x0, alpha, generator=g)
    w = torch.randn(V, D, generator=g).mul_(D**-0.5)  # in place: no second (V, D) temporary
    return {
        "kernel": kernel,
        "h": torch.randn(B, L, D, generator=g).to(device).requires_grad_(),
        "w": w.to(device).requires_grad_(),
        "x0": x0.to(device),
        "z": z.to(device),
        "alpha": alpha.to(device),
        "dalpha": torch.full_like(alpha, -0.999).to(device),
    }


def _rows(t, L):
    return t[:, None].expand(-1, L).reshape(-1)


def skip_reason(case: str, V: int, B: int, L: int, device: str) -> str | None:
    """Why `case` cannot run here, or None."""
    if case == "naive" and B * L * V > NAIVE_MAX_ELEMENTS:
        return f"B·L·V > {NAIVE_MAX_ELEMENTS:.2g} (~20 dense (N, V) tensors)"
    if case == "torch_flce" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    if case in ("liger_flce", "cce"):
        if device != "cuda":
            return "CUDA-only kernel (Triton)"
        module = "liger_kernel" if case == "liger_flce" else "cut_cross_entropy"
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed (pip install {module.replace('_', '-')})"
    return None


def loss_fn(case: str, i: dict):
    """The case's summed loss as a function of (h, W)."""
    kern, x0, z, a, da = i["kernel"], i["x0"], i["z"], i["alpha"], i["dalpha"]
    L, flat = x0.shape[1], x0.flatten()
    if case == "ce":
        return lambda h, w: F.cross_entropy(F.linear(h, w).flatten(0, 1), flat, reduction="sum")
    if case == "torch_flce":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w: F.linear_cross_entropy(
            h.flatten(0, 1), w, flat, reduction="sum", options=opts
        )
    if case == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda h, w: liger(w, h.flatten(0, 1), flat)
    if case == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w: linear_cross_entropy(h.flatten(0, 1), w, flat, reduction="sum")
    if case == "naive":
        rows = (_rows(a, L), _rows(da, L))
        return lambda h, w: naive_nelbo(
            kern, F.linear(h, w).flatten(0, 1), flat, z.flatten(), *rows
        ).sum()
    if case == "unfused":
        return lambda h, w: kern.nelbo(F.linear(h, w), x0, z, a, da).sum()
    recompute = case == "fused_recompute"
    return lambda h, w: fused_nelbo(h, w, kern, x0, z, a, da, recompute=recompute).sum()


def check_naive(inputs: dict) -> float:
    """Max |naive − kernel.nelbo| on a slice: the baseline computes the same loss."""
    kern, x0, z = inputs["kernel"], inputs["x0"][:1, :32], inputs["z"][:1, :32]
    a, da = inputs["alpha"][:1], inputs["dalpha"][:1]
    with torch.no_grad():
        lg = F.linear(inputs["h"][:1, :32], inputs["w"])
        ref = kern.nelbo(lg, x0, z, a, da).flatten()
        naive = naive_nelbo(kern, lg[0], x0[0], z[0], _rows(a, 32), _rows(da, 32))
    return (naive - ref).abs().max().item()


def _status_kb(field: str) -> int:
    line = next(x for x in open("/proc/self/status").read().splitlines() if x.startswith(field))
    return int(line.split()[1])


def run_child(case: str, V: int, B: int, L: int, device: str) -> dict:
    """One case in this (fresh) process: calls until the chunk probe has settled, one timed."""
    inputs = make_inputs(V, B, L, device)
    fn, h, w = loss_fn(case, inputs), inputs["h"], inputs["w"]
    cuda = device == "cuda"

    def call() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(h, w).backward()
        if cuda:
            torch.cuda.synchronize()
        h.grad = w.grad = None
        return time.perf_counter() - start

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS") * 1024
    warmup = []
    while case in WARMUP and (not warmup or _probe_open()) and len(warmup) < MAX_WARMUP:
        warmup.append(call())
    elapsed = call()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    return {
        "time_s": elapsed,
        "warmup_s": warmup,
        "peak_mb": (peak - base) / 2**20,
        "chunk": {str(k[4]): p.chosen for k, p in fused_plan._PROBES.items()},
        "probe_per_row_s": {str(k[4]): p.per_row_s for k, p in fused_plan._PROBES.items()},
    }


def _probe_open() -> bool:
    return any(p.chosen is None for p in fused_plan._PROBES.values())


def run_case(case: str, V: int, B: int, L: int, device: str) -> dict:
    """`run_child` (one timed call) in a fresh `python -m benchmarks.loss_bench` process."""
    cmd = [sys.executable, "-m", "benchmarks.loss_bench", case, str(V), str(B), str(L), device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def vs_ce(cases: dict) -> dict:
    """Ratios to CE: of the medians, and the median of the per-repeat ratios (each repeat runs
    every case once, so its ratio shares that repeat's machine load)."""
    ce = cases["ce"]
    out = {}
    for c, r in cases.items():
        per_repeat = [a["time_s"] / b["time_s"] for a, b in zip(r["runs"], ce["runs"], strict=True)]
        out[c] = {
            "time": r["time_s"] / ce["time_s"],
            "time_per_repeat": statistics.median(per_repeat),
            "time_per_repeat_all": per_repeat,
            "mem": r["peak_mb"] / ce["peak_mb"],
        }
    return out


SIZES = {"30522": (30522, 8, 128), "50258": (50258, 8, 128), "126464": (126464, 2, 1024)}


def sizes(quick: bool) -> list[tuple[int, int, int]]:
    return [SIZES["30522"], SIZES["50258"]] + ([] if quick else [SIZES["126464"]])


def bench(
    quick: bool, repeats: int = 3, device: str = "cpu", cases=CASES, on_row=None, only=None
) -> list[dict]:
    """One row per size: per case the median over `repeats` fresh processes, ratios to CE.

    The repeats are the outer loop (case order ce, ..., fused_recompute inside each), so a change
    in machine load hits every case alike.
    """
    rows = []
    for V, B, L in only or sizes(quick):
        row = {"V": V, "B": B, "L": L, "device": device, "cases": {}, "skipped": {}}
        row["naive_max_abs_err"] = check_naive(make_inputs(V, 1, 32))
        runs: dict[str, list[dict]] = {}
        for case in cases:
            reason = skip_reason(case, V, B, L, device)
            if reason:
                row["skipped"][case] = reason
            else:
                runs[case] = []
        for _ in range(repeats):
            for case in runs:
                runs[case].append(run_case(case, V, B, L, device))
                print(f"loss V={V} {B}×{L} {case}: {runs[case][-1]}", flush=True)
        for case, rs in runs.items():
            row["cases"][case] = {
                "time_s": statistics.median(r["time_s"] for r in rs),
                "peak_mb": statistics.median(r["peak_mb"] for r in rs),
                "runs": rs,
            }
        row["vs_ce"] = vs_ce(row["cases"])
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


LABELS = {
    "ce": "CE",
    "torch_flce": "torch linear_cross_entropy (chunked)",
    "liger_flce": "Liger FLCE",
    "cce": "Cut Cross-Entropy",
    "naive": "naive dense XDLM (baseline)",
    "unfused": "XDLM unfused",
    "fused": "XDLM fused (stored gradients)",
    "fused_recompute": "XDLM fused (recompute)",
}
BEGIN, END = "<!-- BEGIN LOSS RESULTS (benchmarks/loss_bench.py) -->", "<!-- END LOSS RESULTS -->"


def table(rows: list[dict]) -> list[str]:
    """Markdown: one line per (size, case) with time, peak memory and both ratios to CE."""
    out = [
        "| V | B×L | case | time s (median) | peak MB | time / CE | time / CE per repeat "
        "(median; range) | mem / CE | mem / unfused | chunk rows |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        size, unf = (f"{r['V']}", f"{r['B']}×{r['L']}"), r["cases"].get("unfused")
        for case in (c for c in CASES if c in r["cases"] or c in r["skipped"]):
            if case in r["skipped"]:
                out.append(
                    f"| {size[0]} | {size[1]} | {LABELS[case]} | skipped: "
                    f"{r['skipped'][case]} | | | | | | |"
                )
                continue
            c, q = r["cases"][case], r["vs_ce"][case]
            mem_unf = f"{c['peak_mb'] / unf['peak_mb']:.2f}" if unf else "–"
            variant = "recompute" if case == "fused_recompute" else "stored"
            chunk = sorted({r["chunk"][variant] for r in c["runs"] if variant in r["chunk"]})
            rng = q["time_per_repeat_all"]
            out.append(
                f"| {size[0]} | {size[1]} | {LABELS[case]} | {c['time_s']:.2f} | "
                f"{c['peak_mb']:.0f} | {q['time']:.2f} | {q['time_per_repeat']:.2f}; "
                f"{min(rng):.2f}–{max(rng):.2f} | {q['mem']:.2f} | {mem_unf} | "
                f"{', '.join(map(str, chunk))} |"
            )
    return out


def write_doc(data: dict, doc) -> None:
    """Replace the loss block of docs/performance.md with this run's table."""
    m = data["machine"]
    head = (
        f"Run: {m['date']}, {m['cpu']} ({m['capability']}), torch {m['torch']}, "
        f"{m['threads']} threads, fp32, k = {K}, D = {D}; each case in a fresh process, "
        f"median over {data['repeats']} processes (fused: after the chunk probe settled)."
    )
    if data.get("note"):
        head += " " + data["note"]
    text = doc.read_text()
    before, rest = text.split(BEGIN)
    after = rest.split(END)[1]
    block = "\n".join([BEGIN, head, "", *table(data["loss"]), END])
    doc.write_text(before + block + after)


def render_saved(path, doc) -> None:
    """Rewrite the docs block from a saved JSON (e.g. after an interrupted or partial run)."""
    import json as _json

    data = _json.loads(path.read_text())
    for row in data["loss"]:
        row["vs_ce"] = vs_ce(row["cases"])
    write_doc(data, doc)


def main() -> None:
    import argparse
    from pathlib import Path

    from benchmarks.common import RESULTS, machine, save

    parser = argparse.ArgumentParser(description="all loss cases; JSON to benchmarks/results")
    parser.add_argument("mode", choices=["all", "render"], help="render: docs from loss.json")
    parser.add_argument("--quick", action="store_true", help="only V = 30522, 50258 at 8×128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--docs", action="store_true", help="rewrite the docs/performance.md block")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help="V of the sizes to run")
    parser.add_argument("--name", help="results file stem (default: loss, loss_quick with --quick)")
    args = parser.parse_args()
    doc = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
    if args.mode == "render":
        render_saved(RESULTS / "loss.json", doc)
        return
    data = {"machine": machine(), "repeats": args.repeats}
    name = args.name or ("loss_quick" if args.quick else "loss")
    only = [SIZES[v] for v in args.sizes] if args.sizes else None

    def on_row(rows):  # save after every size: a long run keeps what it has measured
        print(f"saved {save(name, data | {'loss': rows})}", flush=True)

    data["loss"] = bench(args.quick, args.repeats, args.device, args.cases, on_row, only)
    if args.docs:
        write_doc(data, doc)


if __name__ == "__main__" and sys.argv[1:2] in (["all"], ["render"]):
    main()
elif __name__ == "__main__":
    case, V, B, L = sys.argv[1], *map(int, sys.argv[2:5])
    device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    torch.manual_seed(0)
    print(json.dumps(run_child(case, V, B, L, device)))
