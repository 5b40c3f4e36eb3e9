"""The footer, fitted to the terminal: keys that do not fit are left out whole.

Textual's footer clips its last key at the right edge ("^b Cha"); here a key either shows
whole or not at all, in binding order, and the palette key on the right always stays.
"""

from __future__ import annotations

from rich.cells import cell_len
from textual import events
from textual.widgets import Footer
from textual.widgets._footer import FooterKey  # not exported; textual is pinned below 9


def key_width(key: FooterKey) -> int:
    # Non-compact style: " key " then "desc " (FooterKey's component paddings).
    width = cell_len(key.key_display) + 2
    return width + cell_len(key.description) + 1 if key.description else width


class FittedFooter(Footer):
    def on_resize(self, event: events.Resize) -> None:
        self._fit()

    def on_mount(self) -> None:
        self.call_after_refresh(self._fit)

    async def recompose(self) -> None:
        await super().recompose()
        self._fit()

    def _fit(self) -> None:
        keys = list(self.query(FooterKey))
        palette = [k for k in keys if k.has_class("-command-palette")]
        room = self.size.width - sum(key_width(k) + 2 for k in palette)  # + its border, padding
        for key in keys:
            if key in palette:
                continue
            need = key_width(key)
            key.display = need <= room
            room -= need if key.display else room  # after the first that does not fit, none
