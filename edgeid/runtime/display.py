"""Text from outside (file names from seized media, display names, reasons) made safe to show.

Unicode direction controls reorder what a reader sees: ``ok/\u202egpj.exe`` displays as
``ok/exe.jpg``. On web pages and in the case report they are shown as a visible marker
(``⟨U+202E⟩``); at the terminal they and every other control character (a newline forges an
output line, ESC[2J clears the screen) are shown as escapes.
"""

from __future__ import annotations

# The Unicode bidirectional formatting characters: marks, embeddings, overrides, isolates.
BIDI_CONTROLS = frozenset((0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)))

_VISIBLE_BIDI = {c: f"\u27e8U+{c:04X}\u27e9" for c in BIDI_CONTROLS}
_TERMINAL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {
    c: f"\\u{c:04x}" for c in BIDI_CONTROLS
}


def visible_bidi(text: str) -> str:
    """``text`` with each direction control replaced by a visible ``⟨U+XXXX⟩``."""
    return text.translate(_VISIBLE_BIDI)


def terminal_safe(text: str) -> str:
    """``text`` for one terminal line: control and direction characters as escapes (a
    newline as ``\\x0a``, ESC as ``\\x1b``, U+202E as ``\\u202e``)."""
    return text.translate(_TERMINAL)
