"""The sandbox's limits hold for the whole process tree (issue 27.3): `memory_mb` of address
space shared by its at most 1 + max_procs processes, `disk_mb` of files in its tmpfs; exactly at
each limit passes, one page / byte beyond is a "memory" / "disk" verdict; no RAM-backed storage
outside both (the seccomp filter, no nested user namespace)."""

from __future__ import annotations

import errno
import struct

import pytest
from test_sandbox import needs_bwrap, report, run

from xdlm.eval import sandbox, seccomp
from xdlm.eval.sandbox import SandboxUnavailableError, run_sandboxed

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


@needs_bwrap
@pytest.mark.parametrize(("files", "status"), [(10, "passed"), (11, "disk")],
                         ids=["files-at-limit", "one-file-over"])  # fmt: skip
def test_file_count_is_bounded(files, status):
    """Empty files cost kernel memory (about 1 KiB each) that no byte count sees: max_files
    bounds them, directories and links included."""
    probe = f"""
        import os
        os.mkdir("/tmp/d")
        os.symlink("d", "/tmp/link")
        for i in range({files} - 2):
            open(f"/tmp/d/{{i}}", "w").close()
    """
    assert run(probe, max_files=10).status == status


@needs_bwrap
def test_the_program_holds_no_capability():
    """The tmpfs is mounted before the harness starts; the program cannot mount or remount."""
    probe = """
        import ctypes, json, sys
        libc = ctypes.CDLL(None, use_errno=True)
        caps = {line.split(":")[0]: int(line.split()[1], 16) for line in open("/proc/self/status")
                if line.startswith(("CapPrm", "CapEff", "CapAmb"))}
        mounted = libc.mount(b"tmpfs", b"/sandbox", b"tmpfs", 0, b"size=1g"), ctypes.get_errno()
        print(json.dumps({"caps": caps, "mount": mounted}), file=sys.stderr)
    """
    got = report(run(probe))
    assert got == {"caps": {"CapPrm": 0, "CapEff": 0, "CapAmb": 0}, "mount": [-1, errno.EPERM]}


@needs_bwrap
def test_refuses_where_the_tmpfs_cannot_be_mounted(monkeypatch):
    """Fails closed: a setup that cannot mount its limited tmpfs is a refusal, not a run."""
    monkeypatch.setattr(sandbox, "_SETUP", sandbox._SETUP.replace("mode=1777", "bogus=1"))
    sandbox._check_bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailableError, match="setup: Invalid argument"):
            run_sandboxed("pass")
    finally:
        sandbox._check_bwrap.cache_clear()


def test_memory_share_must_fit_an_interpreter():
    assert run_sandboxed("pass", memory_mb=128, max_procs=3, isolation="none").passed
    with pytest.raises(ValueError, match=r"31\.8 MiB each.*raise memory_mb to 128"):
        run_sandboxed("pass", memory_mb=127, max_procs=3, isolation="none")
    for bad in ({"disk_mb": 0}, {"max_files": 0}):
        with pytest.raises(ValueError, match="disk_mb and max_files must be positive"):
            run_sandboxed("pass", **bad)


@needs_bwrap
def test_no_memory_outside_the_budget():
    """RAM that neither RLIMIT_AS nor the tmpfs counts: memfd files, System V shared memory
    (outlives its detach), the same call by its x32 number, a nested user namespace (could
    mount its own tmpfs). All refused."""
    probe = """
        import ctypes, json, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        def call(fn, *args):
            return fn(*args), ctypes.get_errno()
        out = {"shmget": call(libc.shmget, 0, 1 << 20, 0o1600),
               "unshare_user": call(libc.unshare, 0x10000000)}  # CLONE_NEWUSER
        if os.uname().machine == "x86_64":
            out["x32_memfd_create"] = call(libc.syscall, 0x40000000 | 319, b"m", 0)
        try:
            os.memfd_create("m")
            out["memfd_create"] = "created"
        except OSError as err:
            out["memfd_create"] = (-1, err.errno)
        print(json.dumps(out), file=sys.stderr)
    """
    got = report(run(probe))
    assert got.pop("unshare_user") == [-1, errno.ENOSPC]  # user namespaces: max 0
    assert set(map(tuple, got.values())) == {(-1, errno.EPERM)}


_LD, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06
_ALLOW, _EPERM = 0x7FFF0000, 0x00050000 | errno.EPERM


def _bpf(program: bytes, arch: int, nr: int) -> int:
    """What the classic BPF `program` returns for a system call (a, k: accumulator, constant)."""
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    data, a, pc = {0: nr, 4: arch}, 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == _LD:  # ld [k]
            a = data[k]
        elif code in (_JEQ, _JGE):  # jeq / jge #k
            pc += jt if (a == k if code == _JEQ else a >= k) else jf
        else:  # ret #k
            return k


@pytest.mark.parametrize(
    ("machine", "arch", "nr", "allowed"),
    [("x86_64", 0xC000003E, 0, True), ("x86_64", 0xC000003E, 319, False),
     ("x86_64", 0xC000003E, 29, False), ("x86_64", 0xC000003E, 447, False),
     ("x86_64", 0xC000003E, 0x40000000 | 319, False), ("x86_64", 0x40000003, 356, False),
     ("x86_64", 0x40000003, 1, False), ("aarch64", 0xC00000B7, 279, False),
     ("aarch64", 0xC00000B7, 194, False), ("aarch64", 0xC00000B7, 319, True)],
    ids=["x86_64-read", "memfd_create", "shmget", "memfd_secret", "x32", "i386-memfd",
         "i386-exit", "arm64-memfd_create", "arm64-shmget", "arm64-other"],
)  # fmt: skip
def test_seccomp_program(machine, arch, nr, allowed):
    verdict = _bpf(seccomp.deny_filter(machine), arch, nr)
    assert verdict == (_ALLOW if allowed else _EPERM)
    assert seccomp.deny_filter("riscv64") is None


@pytest.mark.parametrize(
    ("machine", "listing"),
    [("x86_64", [(_LD, 0, 0, 4), (_JEQ, 0, 6, 0xC000003E), (_LD, 0, 0, 0),
                 (_JGE, 4, 0, 0x40000000), (_JEQ, 3, 0, 29), (_JEQ, 2, 0, 319),
                 (_JEQ, 1, 0, 447), (_RET, 0, 0, _ALLOW), (_RET, 0, 0, _EPERM)]),
     ("aarch64", [(_LD, 0, 0, 4), (_JEQ, 0, 5, 0xC00000B7), (_LD, 0, 0, 0),
                  (_JEQ, 3, 0, 194), (_JEQ, 2, 0, 279), (_JEQ, 1, 0, 447),
                  (_RET, 0, 0, _ALLOW), (_RET, 0, 0, _EPERM)])],
)  # fmt: skip
def test_seccomp_program_listing(machine, listing):
    """The whole program, instruction by instruction (code, jt, jf, k), as a disassembler shows
    it: load arch, deny a foreign one, load nr, deny x32 numbers and the three calls, else allow.
    Loads and returns carry no jump offsets (the kernel ignores them; canonical form has 0)."""
    program = seccomp.deny_filter(machine)
    assert [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)] == (
        listing
    )
