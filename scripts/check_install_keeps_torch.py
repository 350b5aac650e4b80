"""Check that installing xdlm keeps the torch already in the environment (no download).

For each torch version, a throw-away venv (no pip of its own) sees this environment's packages
through a `.pth` file and, ahead of them, a fake `torch-<version>.dist-info` (metadata only).
`pip install --dry-run --no-index --report` of the project must then install `xdlm` alone:
torch absent from the report means pip keeps the user's torch. With `--no-index` a torch that
does not satisfy the project's range makes pip fail to resolve, which is the expected outcome
for the negative control (a torch older than the range's floor).

    python scripts/check_install_keeps_torch.py                     # the default versions
    python scripts/check_install_keeps_torch.py 2.12.0+cu128        # any versions
"""

from __future__ import annotations

import argparse
import json
import site
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Versions a user may hold beside a CUDA build; all must be kept.
KEPT = ("2.6.0+cu124", "2.12.0+cu128")
TOO_OLD = "2.5.1+cu121"  # below the floor: pip must refuse to keep it


def dry_run_install(torch_version: str | None, project: Path = ROOT) -> tuple[int, list[str]]:
    """(pip exit code, names pip would install) for `pip install -e project` beside torch.

    `torch_version` None uses this environment's own torch unchanged.
    """
    with tempfile.TemporaryDirectory() as tmp:
        python = sys.executable
        if torch_version is not None:
            python = _fake_torch_env(Path(tmp) / "env", torch_version)
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
               "--quiet", "--report", str(report), "-e", str(project)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return proc.returncode, []
        installs = json.loads(report.read_text())["install"]
        return 0, [item["metadata"]["name"].lower() for item in installs]


def _fake_torch_env(env_dir: Path, version: str) -> str:
    """A venv whose torch is a metadata-only `version`, with this env's packages behind it."""
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    sp = Path(purelib)
    (sp / "zz_outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    info = sp / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    return str(python)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", default=list(KEPT))
    args = parser.parse_args(argv)
    failures = []
    for version in [None, *args.versions]:
        rc, names = dry_run_install(version)
        label = version or "this environment's torch"
        ok = rc == 0 and "torch" not in names
        print(f"{'ok  ' if ok else 'FAIL'} {label}: pip rc={rc}, would install {names}")
        failures += [] if ok else [label]
    rc, names = dry_run_install(TOO_OLD)
    control = rc != 0 or "torch" in names
    print(f"{'ok  ' if control else 'FAIL'} control {TOO_OLD}: pip rc={rc}, would install {names}")
    failures += [] if control else [f"control {TOO_OLD}"]
    if failures:
        print(f"install would replace torch for: {failures}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
