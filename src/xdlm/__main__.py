"""`python -m xdlm ...` (also what `torchrun -m xdlm train ...` runs)."""

from xdlm.cli import main

raise SystemExit(main())
