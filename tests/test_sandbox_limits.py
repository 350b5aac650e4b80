"""The sandbox's limits hold for the whole process tree (issue 27.3): `memory_mb` of address
space shared by its at most 1 + max_procs processes, `disk_mb` of files in its tmpfs; exactly at
each limit passes, one page / byte beyond is a "memory" / "disk" verdict."""

from __future__ import annotations

import pytest
from test_sandbox import needs_bwrap, report, run

from xdlm.eval.sandbox import run_sandboxed

MiB = 2**20

# Each process maps its address space up to exactly its share (RLIMIT_AS) with all of them alive
# at once; with EXTRA > 0 the children ask for EXTRA bytes more (ENOMEM in a child).
TREE = """
    import json, mmap, os, resource, sys
    share = resource.getrlimit(resource.RLIMIT_AS)[0]

    def take(extra):
        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                  if line.startswith("VmSize:"))
        return mmap.mmap(-1, share - vm + extra)

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    for _ in range({children}):
        if os.fork() == 0:
            os.close(go_w)
            try:
                held = take({extra})
            finally:
                os.write(ready_w, b"1")
            os.read(go_r, 1)  # hold the mapping until the parent closes go_w
            os._exit(0)
    held = take(0)
    ready = sum(len(os.read(ready_r, 1)) for _ in range({children}))
    os.close(go_w)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    print(json.dumps({{"share": share, "ready": ready}}), file=sys.stderr)
"""


@needs_bwrap
@pytest.mark.parametrize(("extra", "status"), [(0, "passed"), (4096, "memory")],
                         ids=["at-limit", "one-page-over"])  # fmt: skip
def test_memory_budget_holds_for_the_whole_tree(extra, status):
    result = run(TREE.format(children=3, extra=extra), memory_mb=256, max_procs=3)
    assert result.status == status
    if status == "passed":  # 4 processes, each mapping exactly 256 MiB / 4 at the same time
        assert report(result) == {"share": 64 * MiB, "ready": 3}


@needs_bwrap
def test_forked_children_cannot_multiply_memory():
    """The issue's attack: 8 children × 200 MB under memory_mb=256 (1.46 GB resident before)."""
    probe = """
        import json, os, sys
        r, w = os.pipe()
        forked = 0
        for _ in range(8):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                block = b"x" * (200 * 1024 * 1024)
                os.write(w, b"1")
                os._exit(0)
            forked += 1
        os.close(w)
        for _ in range(forked):
            os.wait()
        allocated = len(os.read(r, 64))
        print(json.dumps({"forked": forked, "allocated": allocated}), file=sys.stderr)
    """
    result = run(probe, memory_mb=256)  # max_procs=3: 4 processes × 64 MiB
    assert result.status == "memory"
    assert report(result) == {"forked": 3, "allocated": 0}


@needs_bwrap
@pytest.mark.parametrize(
    ("sizes", "disk_mb", "status"),
    [([MiB] * 4, 4, "passed"), ([MiB] * 4 + [1], 4, "disk"),
     ([16 * MiB], 32, "passed"), ([16 * MiB + 1], 32, "disk")],
    ids=["disk-at-limit", "disk-one-byte-over", "file-at-16MiB", "file-one-byte-over"],
)  # fmt: skip
def test_disk_budget_holds_for_all_files(sizes, disk_mb, status):
    probe = f"""
        for i, size in enumerate({sizes}):
            with open(f"/tmp/f{{i}}", "wb") as fh:
                fh.write(b"x" * size)
    """
    assert run(probe, disk_mb=disk_mb).status == status


@needs_bwrap
def test_filling_tmp_is_a_disk_verdict():
    """The issue's attack: 40 × 16 MiB files in /tmp (RAM-backed) passed before."""
    probe = """
        import json, os, sys
        written = 0
        try:
            for i in range(40):
                with open(f"/tmp/f{i}", "wb") as fh:
                    fh.write(b"x" * (16 * 1024 * 1024))
                written += 1
        finally:
            print(json.dumps({"written": written}), file=sys.stderr)
    """
    result = run(probe)  # disk_mb=64 by default
    assert result.status == "disk" and report(result) == {"written": 4}


def test_memory_share_must_fit_an_interpreter():
    assert run_sandboxed("pass", memory_mb=128, max_procs=3, isolation="none").passed
    with pytest.raises(ValueError, match=r"31\.8 MiB each.*raise memory_mb to 128"):
        run_sandboxed("pass", memory_mb=127, max_procs=3, isolation="none")
    with pytest.raises(ValueError, match="disk_mb must be positive"):
        run_sandboxed("pass", disk_mb=0)
