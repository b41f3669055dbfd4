"""Peer strings as a user sees them.

Advertised names, models, SSIDs and a device's reasons and details come from
the other side of a link: shown as they are, a control character could move
the cursor, clear a line or forge a log line. Every role shows them through
:func:`printable`.
"""

from __future__ import annotations


def printable(text: str, limit: int = 64) -> str:
    """``text`` with each non-printable character (controls, line breaks) as ``?``,
    cut to ``limit`` characters."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
