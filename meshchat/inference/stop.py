"""Stop strings in a text stream: hold back what might be the start of one, cut at a match."""

from __future__ import annotations


class StopStringFilter:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Feed new text; return what can safely be shown now."""
        if self.stopped:
            return ""
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        hold = self._longest_partial_stop(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return "" if self.stopped else text

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-length:]):
                    best = length
                    break
        return best
