"""Stored text shown to people: what cannot be seen is spelled out.

Text parameters are checked against their family's charset when a downlink is
scheduled, but a value queued by an older release may hold a NUL, a bidi
override or a control character. Shown as is, it would be invisible or reorder
the text around it; the web panel (and any text output) shows ``\\u0000``,
``\\u202e``… instead. JSON output needs none of this: JSON escapes it itself.
"""

from __future__ import annotations

from typing import Any


def visible(value: Any) -> Any:
    """``value`` with every non-printable character as ``\\uXXXX`` (``\\UXXXXXXXX``); non-text as is."""
    if not isinstance(value, str) or value.isprintable():
        return value
    return "".join(char if char.isprintable() else _escape(char) for char in value)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
