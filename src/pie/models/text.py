"""Text that enters pie from outside (command-line arguments, JSON input, inferlet strings) must be
valid Unicode: lone surrogates (what Python makes of non-UTF-8 bytes in argv, or a JSON "\\ud800"
escape) cannot be tokenized. `unicode_problem` finds the first one and says what it was."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def unicode_problem(text: str) -> str | None:
    """None for valid text, else where it is broken and why, e.g. 'byte 0xff at character 3 is not UTF-8'."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    code = ord(m.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: an undecodable byte of argv or a file name
        return f"byte 0x{code - 0xDC00:02x} at character {m.start()} is not UTF-8"
    return f"lone surrogate U+{code:04X} at character {m.start()} is not text"
