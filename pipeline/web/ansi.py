"""ANSI terminal colours (SGR escape sequences) to HTML spans, for job logs.

Only colours and bold/italic/underline are kept, as CSS classes (`ansi-fg-1`, `ansi-bg-4`,
`ansi-bold`, ...) that `static/app.css` styles; every other escape sequence is dropped, and all
text is HTML-escaped.
"""

from __future__ import annotations

import html
import re

# CSI sequences (ESC [ params final-byte) and the two-byte escapes; only SGR ("m") matters.
_ESCAPE = re.compile(r"\x1b(?:\[([0-9;:?]*)([@-~])|[@-Z\\-_])")
_ATTRIBUTES = {1: "ansi-bold", 3: "ansi-italic", 4: "ansi-underline"}
_RESETS = {22: 1, 23: 3, 24: 4}


class AnsiConverter:
    """Converts text to HTML line by line, carrying the colour state from one call to the next.

    A log's colour may be set on one line and reset several lines later; each converted piece is
    closed on its own (its spans balance) so that every line can be a separate HTML element.
    """

    def __init__(self) -> None:
        """Start with no colour."""
        self.fg: int | None = None
        self.bg: int | None = None
        self.attributes: set[int] = set()

    def classes(self) -> str:
        """The CSS classes of the current state, space-separated ('' for plain text)."""
        names = [_ATTRIBUTES[a] for a in sorted(self.attributes)]
        if self.fg is not None:
            names.append(f"ansi-fg-{self.fg}")
        if self.bg is not None:
            names.append(f"ansi-bg-{self.bg}")
        return " ".join(names)

    def convert(self, text: str) -> str:
        """`text` as escaped HTML, coloured runs wrapped in `<span class="...">`."""
        out: list[str] = []
        position = 0
        for match in _ESCAPE.finditer(text):
            self._emit(out, text[position:match.start()])
            position = match.end()
            if match.group(2) == "m":
                self._apply(match.group(1) or "0")
        self._emit(out, text[position:])
        return "".join(out)

    def _emit(self, out: list[str], text: str) -> None:
        if not text:
            return
        classes = self.classes()
        escaped = html.escape(text, quote=False)
        out.append(f'<span class="{classes}">{escaped}</span>' if classes else escaped)

    def _apply(self, params: str) -> None:
        codes = [int(p) if p.isdigit() else 0 for p in re.split(r"[;:]", params)]
        i = 0
        while i < len(codes):
            code = codes[i]
            if code == 0:
                self.fg = self.bg = None
                self.attributes.clear()
            elif code in _ATTRIBUTES:
                self.attributes.add(code)
            elif code in _RESETS:
                self.attributes.discard(_RESETS[code])
            elif 30 <= code <= 37:
                self.fg = code - 30
            elif 90 <= code <= 97:
                self.fg = code - 90 + 8
            elif code == 39:
                self.fg = None
            elif 40 <= code <= 47:
                self.bg = code - 40
            elif 100 <= code <= 107:
                self.bg = code - 100 + 8
            elif code == 49:
                self.bg = None
            elif code in (38, 48):
                # 256-colour (5;n) and true-colour (2;r;g;b) are not mapped: skip their arguments
                # so that they are not read as codes of their own.
                mode = codes[i + 1] if i + 1 < len(codes) else 0
                i += {5: 2, 2: 4}.get(mode, 1)
            i += 1


def ansi_to_html(text: str) -> str:
    """`text` (with ANSI SGR sequences) as escaped HTML with colour spans."""
    return AnsiConverter().convert(text)
