"""Loss forward+backward: time (in process, interleaved) and peak memory (one subprocess each).

Cases, all from hidden states h (B, L, D) through a Linear head W (V, D) to a summed loss:
  ce       plain cross-entropy (the MDLM loss; the floor)
  unfused  `MixedKernel.nelbo` on the logits
  fused    `xdlm.core.fused.fused_nelbo` (never builds the logits)
  naive    BASELINE `benchmarks.naive.naive_nelbo` (dense one-hots, as reference code does)
`*_loss` variants time the loss alone, from a logits leaf (no matmul).

Memory: `python -m benchmarks.loss_bench CASE V B L` runs one case once in a fresh process;
the parent reads that child's own max RSS from `os.wait4` and subtracts the max RSS of the
`inputs` case (same process, only allocates h, W, x0, z_t).
"""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_times
from benchmarks.naive import naive_nelbo
from xdlm.core.fused import fused_nelbo
from xdlm.core.kernel import MixedKernel

D, K = 768, 0.1
NAIVE_MAX_ELEMENTS = 6.5e7  # naive needs ~20 dense (N, V) float32 tensors: skip beyond this


def make_inputs(V: int, B: int, L: int, seed: int = 0) -> dict:
    """h (B, L, D), W (V, D) leaves; x0, z_t (B, L); α, α' (B,); the k = 0.1 kernel."""
    g = torch.Generator().manual_seed(seed)
    kernel = MixedKernel(V, V - 1, K)
    x0 = torch.randint(V - 1, (B, L), generator=g)
    alpha = torch.rand(B, generator=g) * 0.9 + 0.05
    return {
        "kernel": kernel,
        "h": torch.randn(B, L, D, generator=g).requires_grad_(),
        "w": (torch.randn(V, D, generator=g) * D**-0.5).requires_grad_(),
        "x0": x0,
        "z": kernel.sample_marginal(x0, alpha, generator=g),
        "alpha": alpha,
        "dalpha": torch.full_like(alpha, -0.999),
    }


def _rows(t, L):
    return t[:, None].expand(-1, L).reshape(-1)


def loss_fn(case: str, i: dict):
    """The case's loss (B, L) or (N,) as a function of (h, W) or of a logits leaf."""
    kern, x0, z, a, da = i["kernel"], i["x0"], i["z"], i["alpha"], i["dalpha"]
    L = x0.shape[1]
    on_logits = {
        "ce": lambda lg: F.cross_entropy(lg.flatten(0, 1), x0.flatten(), reduction="none"),
        "unfused": lambda lg: kern.nelbo(lg, x0, z, a, da),
        "naive": lambda lg: naive_nelbo(
            kern, lg.flatten(0, 1), x0.flatten(), z.flatten(), _rows(a, L), _rows(da, L)
        ),
    }
    if case == "fused":
        return lambda h, w: fused_nelbo(h, w, kern, x0, z, a, da)
    if case.endswith("_loss"):
        return on_logits[case.removesuffix("_loss")]
    return lambda h, w: on_logits[case](F.linear(h, w))


def run_case(case: str, i: dict) -> None:
    """One forward + backward of `case` (gradients into h and W, or into a logits leaf)."""
    if case == "inputs":
        return
    if case.endswith("_loss"):
        loss_fn(case, i)(i["logits"]).sum().backward()
    else:
        loss_fn(case, i)(i["h"], i["w"]).sum().backward()
    for t in (i["h"], i["w"], i.get("logits")):
        if t is not None:
            t.grad = None


def child_max_rss_mb(case: str, V: int, B: int, L: int) -> float:
    """Peak RSS (MB) of a fresh `python -m benchmarks.loss_bench case V B L` process.

    The child reports VmHWM (its own address space's high-water mark) from /proc. The child's
    ru_maxrss (RUSAGE_CHILDREN / os.wait4) is unusable: Linux carries the parent's high-water
    mark across fork + exec, so every child would report at least the parent's peak.
    """
    cmd = [sys.executable, "-m", "benchmarks.loss_bench", case, str(V), str(B), str(L)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1]) / 1024  # kB


def sizes(quick: bool) -> list[tuple[int, int, int]]:
    if quick:
        return [(30522, 8, 128), (50258, 8, 128)]
    return [(V, B, L) for V in (30522, 50258, 126464) for B, L in ((8, 128), (2, 1024))]


def naive_fits(V: int, B: int, L: int) -> bool:
    return B * L * V <= NAIVE_MAX_ELEMENTS


def check_naive(inputs: dict) -> float:
    """Max |naive − kernel.nelbo| on a slice: the baseline computes the same loss."""
    with torch.no_grad():
        lg = F.linear(inputs["h"][:1, :32], inputs["w"])
        sl = {k: inputs[k][:1, :32] for k in ("x0", "z")} | {"kernel": inputs["kernel"]}
        sl |= {k: inputs[k][:1] for k in ("alpha", "dalpha")}
        ref = loss_fn("unfused_loss", sl)(lg).flatten()
        return (loss_fn("naive_loss", sl)(lg) - ref).abs().max().item()


def bench(quick: bool, repeats: int) -> list[dict]:
    rows = []
    for V, B, L in sizes(quick):
        inputs = make_inputs(V, B, L)
        with torch.no_grad():
            inputs["logits"] = F.linear(inputs["h"], inputs["w"]).requires_grad_()
        cases = ["ce", "unfused", "fused", "ce_loss", "unfused_loss"]
        if naive_fits(V, B, L):
            cases += ["naive", "naive_loss"]
        err = check_naive(inputs)
        times = interleaved_times(
            {c: (lambda c=c, i=inputs: run_case(c, i)) for c in cases}, repeats
        )
        del inputs
        base = child_max_rss_mb("inputs", V, B, L)
        mem = {c: child_max_rss_mb(c, V, B, L) - base for c in cases if not c.endswith("_loss")}
        rows.append(
            {"V": V, "B": B, "L": L, "time_s": times, "peak_mb": mem, "naive_max_abs_err": err}
        )
        print(f"loss V={V} B×L={B}×{L}: time {times} peak MB {mem}", flush=True)
    return rows


if __name__ == "__main__":
    case, V, B, L = sys.argv[1], *map(int, sys.argv[2:5])
    run_case(case, make_inputs(V, B, L))
    status = open("/proc/self/status").read()
    print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
