"""A continuation's text as its tokens arrive: what is safe to show so far, and where a stop string ends it.

Text is held back while it could still change: an incomplete UTF-8 character at the end (decoders show it
as U+FFFD until its last byte comes), or an ending that could be the start of a stop string (shown once the
next tokens rule the stop string out, never shown when they complete it). Stop strings are searched in
the continuation only, not the prompt, and the first one in the text wins whatever order they are listed in.
"""

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str] | None, stop: list[str]):
        self.decode, self.stop = decode, stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # the whole continuation's text (cut at a stop string once one is found)
        self.shown = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found

    def add(self, ids: list[int]) -> str:
        """Append tokens; the text newly safe to show. After a stop string, nothing more."""
        if self.decode is None or self.stopped:
            self.ids.extend(ids)
            return ""
        self.ids.extend(ids)
        self.text = self.decode(self.ids)
        if self.stop:
            start = max(0, self.shown - self.longest_stop)  # shown text holds no stop string
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
                return self._take(len(self.text))
        return self._take(len(self.text) - self._held_back())

    def flush(self) -> str:
        """At the end of generation: whatever is left, incomplete characters included."""
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Characters at the end of the text that may still change or begin a stop string."""
        text = self.text.rstrip(REPLACEMENT)
        incomplete = len(self.text) - len(text)
        for n in range(min(self.longest_stop - 1, len(text)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return incomplete + n
        return incomplete

    def _take(self, end: int) -> str:
        end = max(end, self.shown)
        out, self.shown = self.text[self.shown:end], end
        return out
