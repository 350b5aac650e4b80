"""The sandbox's seccomp filter: no memory that escapes its address-space limit.

    program = deny_filter()   # bytes for `bwrap --seccomp FD`, or None on other machines

RLIMIT_AS bounds what a process maps, and the tmpfs `--size` what it stores in files; three
system calls create RAM-backed storage that neither counts: `memfd_create` (an anonymous file
filled with write(), never mapped), `memfd_secret`, and `shmget` (System V shared memory, which
outlives its detach). The filter makes them fail with EPERM, and every system call of a foreign
ABI (i386 `int 0x80`, x32) too, so they cannot be reached by another number. A classic BPF
program over `struct seccomp_data` (nr at offset 0, arch at offset 4); x86_64 and aarch64.
"""

from __future__ import annotations

import errno
import platform
import struct

# audit arch, x32 bit (numbers at or above it are another ABI; 0: none), denied numbers
_ARCHES = {
    "x86_64": (0xC000003E, 0x40000000, {"memfd_create": 319, "memfd_secret": 447, "shmget": 29}),
    "aarch64": (0xC00000B7, 0, {"memfd_create": 279, "memfd_secret": 447, "shmget": 194}),
}
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_ALLOW, _DENY = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO


def deny_filter(machine: str | None = None) -> bytes | None:
    """The filter for `machine` (default: this one) as packed `struct sock_filter`s, or None
    where the system call numbers are not known here."""
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    audit_arch, foreign, denied = arch
    numbers = sorted(denied.values())
    # Jump offsets count from the next instruction; `deny` is the last one.
    body = [(_LD_W_ABS, 0, 0, 0)]  # A = nr
    if foreign:
        body.append((_JGE_K, len(numbers) + 1, 0, foreign))
    body += [(_JEQ_K, len(numbers) - i, 0, nr) for i, nr in enumerate(numbers)]
    body.append((_RET_K, 0, 0, _ALLOW))
    head = [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 0, len(body), audit_arch)]  # foreign arch: deny
    program = [*head, *body, (_RET_K, 0, 0, _DENY)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)
