"""`python -m benchmarks.prepare_bench`: streaming `xdlm prepare` throughput, scaling and memory.

Builds synthetic corpora of two sizes from the shared English texts (Wikipedia leads, Austen,
the KJV: ~22.7k real documents, reshuffled with a fixed seed per copy), then runs `prepare`
with the GPT-2 BPE in a subprocess for each (size, --num-proc) case and records:
  - time inside `prepare` (imports excluded), MB/s and MB/s per core (input bytes / time /
    min(num_proc, cores));
  - CPU seconds of the whole process tree (user + sys, main and workers, imports included)
    and MB per CPU-second, after subtracting the CPU time of a process that only imports
    xdlm (measured in the same run): on a shared machine wall time measures the neighbours'
    load, CPU time measures the work;
  - peak memory sampled every 50 ms: RSS of the main process, and the PSS summed over the
    process tree (main + forked workers; PSS splits the pages they share, which RSS would
    count once per process);
  - the tokenizer's own `encode_batch` speed on the same documents, in the same run: one
    thread (TOKENIZERS_PARALLELISM=false) in MB/s and MB per CPU-second, and its default
    thread pool in MB/s; the ratios prepare / encode_batch (wall: against one thread per
    process; CPU: MB per CPU-second) say what the pipeline (reading twice, framing, pickling
    to workers, writing, hashing) costs on top of tokenization.
Writes benchmarks/results/prepare.json.

    python -m benchmarks.prepare_bench                       # 0.02 and 0.1 GB (the default)
    python -m benchmarks.prepare_bench --sizes-gb 0.3 1.5 --num-proc 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import save

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TEXTS = ("wiki_vital.txt.gz", "austen.txt.gz", "kjv.txt.gz")  # real documents (brown is one)
ENCODE_SAMPLE_MB = 8


def synthetic_corpus(path: Path, size_gb: float, seed: int = 0) -> int:
    """Write about `size_gb` GB of blank-line-separated documents; return the bytes written."""
    from xdlm.data.documents import read_documents

    docs = [d for name in TEXTS for d in read_documents(SHARED / "text" / name)]
    rng, target, written = random.Random(seed), int(size_gb * 1e9), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(docs)
            for doc in docs:
                written += f.write(doc + "\n\n")
                if written >= target:
                    break
    return path.stat().st_size


_PREPARE = """
import sys, time
from xdlm.data import prepare
start = time.perf_counter()
m = prepare(sys.argv[1], sys.argv[2], tokenizer="gpt2", tokenizer_source=sys.argv[3],
            seq_len=1024, num_proc=int(sys.argv[4]), overwrite=True, progress=False)
print(time.perf_counter() - start, sum(s.tokens for s in m.splits.values()))
"""


def run_prepare(corpus: Path, out: Path, num_proc: int) -> dict:
    """Time `prepare` in a subprocess and sample its process tree's memory."""
    args = [str(corpus), str(out), str(SHARED / "tokenizers" / "gpt2"), str(num_proc)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # one core per process, as counted
    cpu0 = _children_cpu_s()
    proc = psutil.Popen([sys.executable, "-c", _PREPARE, *args], env=env,
                        stdout=subprocess.PIPE, text=True)  # fmt: skip
    peak_tree, peak_main = 0, 0
    while proc.poll() is None:
        try:
            pss = [p.memory_full_info().pss for p in [proc, *proc.children(recursive=True)]]
            peak_main = max(peak_main, proc.memory_info().rss)
        except psutil.Error:
            continue
        peak_tree = max(peak_tree, sum(pss))
        time.sleep(0.05)
    proc.wait()  # reaped: its CPU time (and its workers') now counts in RUSAGE_CHILDREN
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed with exit code {proc.returncode}")
    seconds, tokens = proc.stdout.read().split()
    return {"prepare_s": float(seconds), "cpu_s": _children_cpu_s() - cpu0, "tokens": int(tokens),
            "peak_pss_tree_mb": peak_tree / 2**20,
            "peak_rss_main_mb": peak_main / 2**20}  # fmt: skip


def import_cpu_s() -> float:
    """CPU seconds of a subprocess that only imports `xdlm.data` (the fixed start-up cost)."""
    cpu0 = _children_cpu_s()
    subprocess.run([sys.executable, "-c", "import xdlm.data"], check=True)
    return _children_cpu_s() - cpu0


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_ENCODE = """
import sys, time
from xdlm.data.documents import iter_documents
from xdlm.data.tokenizers import load_tokenizer
tok = load_tokenizer("gpt2", sys.argv[2])
docs, size = [], 0
for d in iter_documents(sys.argv[1]):
    docs.append(d); size += len(d.encode())
    if size >= float(sys.argv[3]) * 1e6:
        break
best, best_cpu = float("inf"), float("inf")
for _ in range(2):
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(docs), 256):
        tok.encode_batch(docs[i : i + 256])
    best = min(best, time.perf_counter() - start)
    best_cpu = min(best_cpu, time.process_time() - cpu)
print(size / 1e6 / best, size / 1e6 / best_cpu)
"""


def encode_batch_mbps(corpus: Path, threads: str) -> tuple[float, float]:
    """The tokenizer's own encode_batch (MB/s, MB per CPU-second) on the corpus's start."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false" if threads == "1" else "true"}
    args = [str(corpus), str(SHARED / "tokenizers" / "gpt2"), str(ENCODE_SAMPLE_MB)]
    out = subprocess.run([sys.executable, "-c", _ENCODE, *args], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    wall, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", default=None, help="where corpora go (default: a temp dir)")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    result = {"cpu": cpu_name(), "cores": cores, "load_avg_start": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "cases": []}  # fmt: skip
    result["import_cpu_s"] = startup = min(import_cpu_s() for _ in range(3))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in args.sizes_gb:
            corpus = Path(tmp) / f"corpus-{size}gb.txt"
            n_bytes = synthetic_corpus(corpus, size)
            one, pool = encode_batch_mbps(corpus, "1"), encode_batch_mbps(corpus, "pool")
            encode = {"one_thread_mb_per_s": one[0], "one_thread_mb_per_cpu_s": one[1],
                      "pool_mb_per_s": pool[0]}  # fmt: skip
            for num_proc in args.num_proc:
                case = run_prepare(corpus, Path(tmp) / "out", num_proc)
                mbps = n_bytes / 1e6 / case["prepare_s"]
                mb_cpu = n_bytes / 1e6 / (case["cpu_s"] - startup)
                used = min(num_proc, cores)
                case |= {"size_gb": n_bytes / 1e9, "num_proc": num_proc, "mb_per_s": mbps,
                         "mb_per_s_per_core": mbps / used,
                         "mb_per_cpu_s": mb_cpu, "encode_batch": encode,
                         "wall_ratio_to_encode_batch": mbps / (one[0] * used),
                         "cpu_ratio_to_encode_batch": mb_cpu / one[1]}  # fmt: skip
                result["cases"].append(case)
                print(json.dumps(case), flush=True)
            corpus.unlink()
    result["load_avg_end"] = os.getloadavg()
    print(f"wrote {save('prepare', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
