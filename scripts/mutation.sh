#!/usr/bin/env bash
# Mutation testing with mutmut (pip install -e '.[dev]'); NOT part of the default CI run.
#
#   scripts/mutation.sh                      # every target in [tool.mutmut] (pyproject.toml)
#   scripts/mutation.sh 'xdlm.core.*'        # one package (mutmut name globs)
#   scripts/mutation.sh 'xdlm.train.*' 40    # a seeded random sample of 40 of its mutants
#   scripts/mutation.sh --resume 'xdlm.data.*'  # only its mutants with no cached verdict yet
#   scripts/mutation.sh --score              # score per package from the cached results
#
# [tool.mutmut] in pyproject.toml lists the mutated files (core/, sampling/, train/, data/,
# the lock, precision, likelihood, detokenizers, safe_pickle: see there) and the fast test files;
# each mutant runs only the selected tests that execute the mutated function, fastest first.
# Results are cached in mutants/ (git-ignored); naming a pattern reruns every mutant it matches,
# changing the test selection forgets every verdict. Scores: docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH  # mutmut puts mutants/src first; the original src must not shadow it
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
CHILDREN="${MUTMUT_CHILDREN:-2}"
if (( CHILDREN > 1 )) && [[ "${PYTEST_ADDOPTS:-}" == *--basetemp* ]]; then
  # each child's pytest session empties --basetemp at its start, under the other child's tests:
  # their failures would count as kills
  echo "PYTEST_ADDOPTS sets --basetemp, which $CHILDREN children would share: use MUTMUT_CHILDREN=1" >&2
  exit 2
fi

if [[ "${1:-}" == "--score" ]]; then
  exec python scripts/mutation_score.py
fi
if [[ "${1:-}" == "--resume" ]]; then  # finish an interrupted full run of a pattern
  mapfile -t names < <(python scripts/mutation_score.py --unchecked "${2:?--resume needs a pattern}")
  if (( ${#names[@]} )); then
    python -m mutmut run --max-children "$CHILDREN" "${names[@]}"
  fi
  exec python scripts/mutation_score.py
fi
pattern="${1:-xdlm.*}"
if [[ -n "${2:-}" ]]; then  # a reproducible sample of the matching mutants
  if [[ ! -d mutants/src ]]; then
    echo "no mutants/ yet: run one package in full first, e.g. $0 'xdlm.eval.likelihood*'" >&2
    exit 2
  fi
  mapfile -t names < <(python scripts/mutation_score.py --sample "$pattern" "$2")
  python -m mutmut run --max-children "$CHILDREN" "${names[@]}"
else
  python -m mutmut run --max-children "$CHILDREN" "$pattern"
fi
python scripts/mutation_score.py
