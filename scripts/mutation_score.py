"""Mutation score per package from mutmut's cached results (mutants/**/*.meta).

    python scripts/mutation_score.py                       # table: package, checked, killed, ...
    python scripts/mutation_score.py --sample 'xdlm.core.*' 150   # a seeded sample of names
    python scripts/mutation_score.py --base COPY   # COPY's verdicts, overridden by mutants/'s
    python scripts/mutation_score.py --unchecked 'xdlm.data.*'  # names of mutants not yet run

(mutmut forgets every verdict when `[tool.mutmut]`'s test selection changes; `--base` merges a
copy of an earlier `mutants/src` with a rerun of its survivors.)

Score = killed / (killed + survived + no tests); timeouts count as killed (the mutant made the
tests hang), "not checked" mutants are left out and reported.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import random
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parents[1] / "mutants" / "src"


def results(root: Path = ROOT) -> dict[str, int | None]:
    """Mutant name -> exit code (None: not checked), over every mutated file under `root`."""
    out: dict[str, int | None] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def package(name: str) -> str:
    """xdlm.core.kernel.x_f__mutmut_3 -> xdlm.core (train, eval, data, models, sampling:
    per file)."""
    parts = name.split(".")
    per_file = parts[1] in ("train", "eval", "data", "models", "sampling")
    return ".".join(parts[:3]) if per_file else ".".join(parts[:2])


def score_table(codes: dict[str, int | None]) -> str:
    counts: dict[str, Counter] = {}
    for name, code in codes.items():
        status = status_by_exit_code[code]
        status = "killed" if status == "timeout" else status
        counts.setdefault(package(name), Counter())[status] += 1
    lines = ["| package | mutants | checked | killed | survived | no tests | score |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for pkg, c in sorted(counts.items()):
        checked = c["killed"] + c["survived"] + c["no tests"]
        score = f"{c['killed'] / checked:.1%}" if checked else "-"
        lines.append(f"| {pkg} | {sum(c.values())} | {checked} | {c['killed']} | "
                     f"{c['survived']} | {c['no tests']} | {score} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", nargs=2, metavar=("GLOB", "N"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--survivors", metavar="GLOB", help="list surviving mutant names")
    parser.add_argument("--unchecked", metavar="GLOB", help="list mutant names not yet run")
    parser.add_argument("--base", type=Path, help="an earlier copy of mutants/src to merge")
    args = parser.parse_args()
    codes = results()
    if args.base is not None:
        codes = {**results(args.base), **{k: c for k, c in codes.items() if c is not None}}
    if args.sample:
        pattern, n = args.sample[0], int(args.sample[1])
        names = sorted(k for k in codes if fnmatch.fnmatch(k, pattern))
        print("\n".join(sorted(random.Random(args.seed).sample(names, min(n, len(names))))))
    elif args.survivors or args.unchecked:  # survived: exit code 0; not run: no code
        pattern, wanted = (args.survivors, 0) if args.survivors else (args.unchecked, None)
        print("\n".join(k for k, c in sorted(codes.items())
                        if fnmatch.fnmatch(k, pattern) and c == wanted))  # fmt: skip
    else:
        print(score_table(codes))


if __name__ == "__main__":
    main()
