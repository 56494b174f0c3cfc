"""Values written into log lines: quoted, escaped and bounded, so that no input can forge a line.

A client controls paths, labels and the names in its certificates and CSRs; a line feed, a
carriage return or a terminal escape among them must reach the log as visible escapes.
"""

from __future__ import annotations

#: Longest value written into a log line, in characters before escaping.
MAX_LOGGED_CHARACTERS = 512


def quote(value: object) -> str:
    """``"value"`` with backslash, double quote and every non-printable character escaped."""
    text = str(value)
    cut = len(text) > MAX_LOGGED_CHARACTERS
    text = text[:MAX_LOGGED_CHARACTERS]
    escaped = "".join(ch if ch.isprintable() and ch not in '"\\' else _escape(ch) for ch in text)
    return f'"{escaped}{"..." if cut else ""}"'


def _escape(ch: str) -> str:
    if ch in '"\\':
        return "\\" + ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def token(value: object) -> str:
    """A value written bare when it is a plain word (labels, operations, addresses), else quoted."""
    text = str(value)
    if (
        text
        and len(text) <= 128
        and all(ch.isascii() and (ch.isalnum() or ch in "_.:-") for ch in text)
    ):
        return text
    return quote(text)
