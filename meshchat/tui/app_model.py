"""The app's model choice: pick a model from the store or a path, and switch to it in place.

The old model (and its mesh pipeline) is closed, the new one loads as at start-up, the split
editor shows the new model's layers, and the planner asks the nodes again: those without the
new model's file (fingerprint) are named and get no layers.
"""

import logging
from pathlib import Path

from textual import work

from meshchat.model.store import ModelStore
from meshchat.tui import messages as msg
from meshchat.tui.app_base import AppBase, worker_error
from meshchat.tui.screens.dialogs import AskText, Pick

log = logging.getLogger(__name__)

OTHER_FILE = "\x00path"  # the Pick key for "another file…" (never a file name)


def check_model_path(text: str) -> str | None:
    """Why `text` cannot be a model file (None: it can be tried)."""
    path = Path(text.strip()).expanduser()
    if not text.strip():
        return "type the path of a .gguf file"
    if not path.is_file():
        return f"no such file: {path}"
    if path.suffix.lower() != ".gguf":
        return "meshchat runs GGUF model files (.gguf)"
    return None


def no_model_welcome(error: str) -> str:
    """The chat pane's first words when there is no model to ask (not "Ask anything")."""
    return (
        f"No model to answer yet: {error}.\n\n"
        "Press [b]Ctrl+O[/] to pick a model from the store or type the path of a .gguf file, "
        "or run [b]meshchat model pull[/] in a shell for the default model."
    )


class ModelMixin(AppBase):
    def action_choose_model(self) -> None:
        if self.generation is not None:
            self.notify("an answer is still being written: wait, or Esc to stop it")
            return
        current = self.engine.info.path if self.engine is not None else None
        choices = [
            (str(path), f"{path.name}{'  (running)' if path == current else ''}")
            for path in ModelStore(self.data.models).models()
        ]
        choices.append((OTHER_FILE, "Another file… (type its path)"))

        def chosen(key: str | None) -> None:
            if key == OTHER_FILE:
                self._ask_model_path()
            elif key:
                self._switch_model(Path(key))

        self.push_screen(Pick("Run which model?", choices), chosen)

    def _ask_model_path(self) -> None:
        def done(text: str | None) -> None:
            if text:
                self._switch_model(Path(text.strip()).expanduser())

        self.push_screen(
            AskText(
                "Model file",
                placeholder="/path/to/model.gguf",
                hint="Enter loads it · Esc cancels",
                check=check_model_path,
            ),
            done,
        )

    @work(exclusive=True, group="model", exit_on_error=False)
    async def _switch_model(self, path: Path) -> None:
        if self.engine is not None and self.engine.info.path == path:
            self.notify(f"{path.name} is already running")
            return
        old, self.engine = self.engine, None
        # The planner and its pipeline are for the old model's fingerprint: a new one follows.
        self.planning = None
        self.split.planner = None
        self.mesh_watch.advised_for = frozenset()
        self.options.model_path = path
        self.model_error = ""
        if old is not None:
            try:
                await old.close()
            except Exception as exc:
                log.warning("closing the old model: %s", worker_error(exc, "model close"))
        self.notify(f"loading {path.name}…", title="Model")
        self.post_message(msg.ModelChosen(path))
