"""`meshchat` with no command: resolve the model and settings, then run the Textual app.

The default model is pulled here, before the screen takes over the terminal, so pip's progress
shows on a normal terminal. Anything the app cannot do (a missing model file, an unreadable
history) is shown inside the app; only errors before it starts end the command with exit 1.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from meshchat.config import load_config, user_themes_dir
from meshchat.errors import MeshchatError, UsageError
from meshchat.inference import memory_budget
from meshchat.inference.local_model import LocalModel
from meshchat.model.store import ModelStore, StoreError
from meshchat.paths import DataDir
from meshchat.tui.theming import BUILTIN_DIR


def run_tui(args: argparse.Namespace) -> int:
    from meshchat.tui.app import AppOptions, MeshchatApp

    if getattr(args, "api", None):
        raise UsageError("--api is served by `meshchat --headless`; the app does not serve it")
    data = DataDir.resolve(args.data_dir)
    config = load_config()
    budget = memory_budget.apply(args.max_memory, config.max_memory)
    model_path: Path | None = None
    model_error = ""
    wanted = args.model or config.model or None
    try:
        model_path = ModelStore(data.models).resolve(wanted)
    except StoreError as exc:
        model_error = str(exc)
    if budget is not None and model_path is not None:
        memory_budget.check_fits(LocalModel.open(model_path, data), config.context_size)
    options = AppOptions(
        data=data,
        config=config,
        model_path=model_path,
        model_error=model_error,
        join_code=args.join,
        theme_dirs=(BUILTIN_DIR, user_themes_dir()),
        debug=args.debug,
        crash_log=data.root / "logs" / "tui-crash.log",
    )
    _log_to_file(data.root / "logs" / "tui.log", args.debug)
    app = MeshchatApp(options)
    app.run()
    if app.crash_message:
        raise MeshchatError(app.crash_message)
    return app.return_code or 0


def _log_to_file(path: Path, debug: bool) -> None:
    """Send log records to a file: a line on stderr would scribble over the screen."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            root.removeHandler(handler)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        root.addHandler(logging.NullHandler())
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
