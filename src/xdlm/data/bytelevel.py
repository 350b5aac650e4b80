"""Decoding byte-level BPE ids to text without losing characters at token boundaries.

Byte-level BPE (GPT-2, our `bpe`) writes every byte b as one printable character (printable
ASCII and Latin-1 bytes as themselves, the other 68 as chr(256 + i) in byte order), so a
multi-byte UTF-8 character can be split across tokens. A sample's tokens are turned back into
their bytes run by run (a special token such as [MASK] ends a run: the bytes under it are
unknown) and each run is decoded at once by `utf8_text`:

  - an incomplete character at either end of a run (a run starting with continuation bytes,
    e.g. a window of a longer text, or ending inside a character, or cut by a mask) is left
    out: it is not wrong, only not all there;
  - a truly invalid byte sequence inside a run becomes U+FFFD, once per maximal invalid part
    (Python's "replace").
"""

from __future__ import annotations

from functools import cache


@cache
def byte_of_char() -> dict[str, int]:
    """The byte-level alphabet: printable char -> the byte it stands for (256 entries)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level token string stands for."""
    table = byte_of_char()
    return bytes(table[c] for c in token)


def _sequence_length(lead: int) -> int:
    """Bytes of the UTF-8 character starting with `lead` (1 for ASCII and invalid leads)."""
    if lead >> 5 == 0b110:
        return 2
    if lead >> 4 == 0b1110:
        return 3
    if lead >> 3 == 0b11110:
        return 4
    return 1


def utf8_text(data: bytes) -> str:
    """`data` as text: incomplete characters at the two ends dropped, invalid bytes inside
    replaced by U+FFFD (module docstring)."""
    start = 0
    while start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
        start += 1
    end = len(data)
    for back in range(1, min(4, end - start) + 1):
        byte = data[end - back]
        if byte & 0xC0 != 0x80:  # the last lead byte: is its character complete?
            if _sequence_length(byte) > back:
                end -= back
            break
    return data[start:end].decode("utf-8", errors="replace")
