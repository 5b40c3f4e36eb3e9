"""Themes from TOML files: the built-in ones (the top-level `themes/` folder) and the user's own.

A theme file holds the fields of `textual.theme.Theme` (name, primary, background, dark, ...) and
an optional `[variables]` table. A file that does not parse, names unknown fields or gives a
colour Textual cannot read is reported and skipped; the others still load.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from textual.color import Color, ColorParseError
from textual.theme import Theme


def _builtin_dir() -> Path:
    """`meshchat/themes/` in an installed wheel (setup.py maps the folder there), the
    repository's top-level `themes/` in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    installed, checkout = package / "themes", package.parent / "themes"
    return installed if installed.is_dir() or not checkout.is_dir() else checkout


BUILTIN_DIR = _builtin_dir()
NODE_COLOUR_VARS = tuple(f"mesh-node-{i}" for i in range(1, 7))
_COLOUR_FIELDS = (
    "primary",
    "secondary",
    "warning",
    "error",
    "success",
    "accent",
    "foreground",
    "background",
    "surface",
    "panel",
    "boost",
)
_KNOWN = {f.name for f in fields(Theme)}


@dataclass(frozen=True)
class ThemeLoad:
    themes: list[Theme]
    problems: list[str]


def theme_from_toml(text: str, source: str) -> Theme:
    """One theme from TOML text; ValueError says what is wrong, naming `source`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"theme {source}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise ValueError(f"theme {source}: unknown fields {', '.join(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"theme {source}: needs a name")
    if not isinstance(data.get("primary"), str):
        raise ValueError(f"theme {source}: needs a primary colour")
    variables = data.get("variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise ValueError(f"theme {source}: [variables] must map names to strings")
    for key in _COLOUR_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"theme {source}: {key} must be a colour string")
        try:
            Color.parse(value)
        except ColorParseError:
            raise ValueError(f"theme {source}: {key} = {value!r} is not a colour") from None
    for key in NODE_COLOUR_VARS:
        if key in variables:
            try:
                Color.parse(variables[key])
            except ColorParseError:
                raise ValueError(
                    f"theme {source}: {key} = {variables[key]!r} is not a colour"
                ) from None
    if not isinstance(data.get("dark", True), bool):
        raise ValueError(f"theme {source}: dark must be true or false")
    return Theme(**data)


def load_themes(*directories: Path) -> ThemeLoad:
    """Every `*.toml` theme in the directories, in order; later ones override by name."""
    by_name: dict[str, Theme] = {}
    problems: list[str] = []
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            try:
                theme = theme_from_toml(path.read_text(encoding="utf-8"), str(path))
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"theme {path}: cannot read it ({exc})")
                continue
            except ValueError as exc:
                problems.append(str(exc))
                continue
            by_name[theme.name] = theme
    return ThemeLoad(list(by_name.values()), problems)


def node_colours(theme: Theme) -> list[str]:
    """The colours the split bar gives nodes, from the theme's variables or its palette."""
    fallback = [
        theme.primary,
        theme.success,
        theme.warning,
        theme.secondary,
        theme.accent,
        theme.error,
    ]
    return [
        theme.variables.get(var) or fallback[i] or theme.primary
        for i, var in enumerate(NODE_COLOUR_VARS)
    ]
