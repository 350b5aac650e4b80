"""Does `torch.compile` of the fused loss's per-chunk arithmetic pay off here?

Times `forward_chunk` + `logit_grad` (the (n, V) work of one chunk, no matmuls) eager and
through `torch.compile(dynamic=True)` (what `fused_nelbo(compile_chunks=True)` uses): the first
compiled call (compile included) and the steady state, at V = 126464, n = 128 rows, fp32.
`python -m benchmarks.fused_compile_bench` prints and saves benchmarks/results/fused_compile.json.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import machine, save
from xdlm.core import fused_chunk as fc
from xdlm.core.kernel import MixedKernel


def chunk_inputs(n: int, V: int) -> tuple[torch.Tensor, fc.RowTargets]:
    g = torch.Generator().manual_seed(0)
    kern = MixedKernel(V, V - 1, 0.1)
    x0 = torch.randint(V - 1, (n,), generator=g)
    alpha = torch.rand(n, generator=g) * 0.9 + 0.05
    z = torch.where(torch.rand(n, generator=g) < 0.5, torch.full_like(x0, V - 1), x0)
    logits = torch.randn(n, V, generator=g).mul_(3.0)
    return logits, fc.RowTargets(kern, x0, z, alpha, torch.full((n,), 0.999))


def one_chunk(ops, logits, t) -> float:
    forward_chunk, logit_grad = ops
    buf, spare = logits.clone(), torch.empty_like(logits)
    start = time.perf_counter()
    res, inv_z = forward_chunk(buf, t, spare)
    logit_grad(buf, inv_z, t, res.grads, spare)
    return time.perf_counter() - start


def main(n: int = 128, V: int = 126464, repeats: int = 3) -> None:
    logits, t = chunk_inputs(n, V)
    eager = (fc.forward_chunk, fc.logit_grad)
    compiled = tuple(torch.compile(f, dynamic=True) for f in eager)
    one_chunk(eager, logits, t)  # warm-up
    first_compiled = one_chunk(compiled, logits, t)
    times = {"eager": [], "compiled": []}
    for _ in range(repeats):  # interleaved: load changes hit both alike
        times["eager"].append(one_chunk(eager, logits, t))
        times["compiled"].append(one_chunk(compiled, logits, t))
    data = {
        "machine": machine(),
        "rows": n,
        "V": V,
        "first_compiled_call_s": first_compiled,
        "eager_s": min(times["eager"]),
        "compiled_s": min(times["compiled"]),
        "times_s": times,
    }
    print(data)
    print(f"saved {save('fused_compile', data)}")


if __name__ == "__main__":
    main()
