"""Rewrite the README's generated blocks: the keys table (from the live bindings, as F1 shows
them) and the documented config.toml (from the settings schema). Tests check both are current:
run this after adding a binding or a setting."""

from __future__ import annotations

import re
from pathlib import Path

from meshchat.config import documented_toml
from meshchat.tui.keys import key_help, markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"README.md lacks the <!-- {name}:start/end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    text = README.read_text(encoding="utf-8")
    text = replace_block(text, "keys", markdown_table(key_help({})))
    text = replace_block(text, "config", f"```toml\n{documented_toml()}```\n")
    README.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
