"""The `meshchat` command line: parse arguments, run one command, map errors to exit codes.

Exit codes: 0 ok, 2 usage error, 1 anything else, with a one-line message on stderr; after
SIGINT/SIGTERM 130/143 (a headless worker: 0), see meshchat.stops.
A traceback is shown only with `--debug`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from meshchat import stops
from meshchat.config import ChatSettings
from meshchat.errors import MeshchatError, UsageError
from meshchat.mesh import polling


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns exit codes."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_common(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # Subcommands accept the common flags too, without resetting a value given before them.
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--data-dir", metavar="PATH", default=default, help="where this node keeps its files"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if top else default,
        help="show tracebacks and debug logs",
    )


def _add_model(parser: argparse.ArgumentParser, top: bool = False) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH",
        default=None if top else argparse.SUPPRESS,
        help="GGUF model file (default: SmolLM2-135M)",
    )


def _add_memory(parser: argparse.ArgumentParser, top: bool = False) -> None:
    parser.add_argument(
        "--max-memory",
        metavar="SIZE",
        default=None if top else argparse.SUPPRESS,
        help="memory this node offers the mesh, e.g. 2G (before MESHCHAT_MEMORY_LIMIT and "
        "max_memory in config.toml; default 90%% of available RAM)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshchat", description="Chat with one model split across machines.")
    _add_common(parser, top=True)
    _add_model(parser, top=True)
    _add_memory(parser, top=True)
    parser.add_argument("--join", metavar="CODE", help="join a mesh with an invite code")
    parser.add_argument("--headless", action="store_true", help="run as a worker, no screen")
    parser.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (headless)")
    parser.add_argument("--invite-file", metavar="PATH", help="write the invite code here")
    parser.add_argument("--invite-uses", metavar="N", type=int, default=1, help="invite uses")
    parser.add_argument("--status-file", metavar="PATH", help="keep a JSON status snapshot here")
    parser.add_argument("--api", metavar="HOST:PORT", help="serve the OpenAI-compatible API")
    parser.add_argument("--api-key", metavar="KEY", help="bearer key the API requires")
    parser.add_argument(
        "--accept-layers",
        metavar="SIZE",
        help="take layers from peers when planned without the model, up to SIZE on disk (4G)",
    )
    parser.add_argument(
        "--api-allow-no-key",
        action="store_true",
        help="let --api serve a non-loopback address without a key (anyone there may use it)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    gen = commands.add_parser("generate", help="one-shot completion to stdout")
    _add_common(gen)
    _add_model(gen)
    _add_memory(gen)
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--raw", action="store_true", help="no chat template")
    gen.add_argument("--max-tokens", type=int, default=256, metavar="N")
    sampling = ChatSettings()  # the defaults, declared once in config.py
    gen.add_argument("--temperature", type=float, default=sampling.temperature, metavar="T")
    gen.add_argument("--top-k", type=int, default=sampling.top_k, metavar="K")
    gen.add_argument("--top-p", type=float, default=sampling.top_p, metavar="P")
    gen.add_argument("--min-p", type=float, default=sampling.min_p, metavar="P")
    gen.add_argument("--repeat-penalty", type=float, default=sampling.repeat_penalty, metavar="R")
    gen.add_argument("--seed", type=int, default=None, metavar="S")
    gen.add_argument("--split", metavar="A,B,...", help="stage boundaries, e.g. 10,20")
    gen.add_argument("--system", metavar="TEXT", help="system prompt (chat mode)")
    gen.add_argument("--transport-dtype", choices=["f32", "f16"], default="f32")
    gen.add_argument("--threads", type=int, default=None, metavar="N")
    gen.add_argument(
        "--join",
        metavar="CODE",
        default=argparse.SUPPRESS,
        help="run on the mesh this invite leads to",
    )

    bench = commands.add_parser("bench", help="performance table")
    _add_common(bench)
    _add_model(bench)
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--repeats", type=int, default=5, metavar="N")
    bench.add_argument("--threads", type=int, default=None, metavar="N")
    bench.add_argument(
        "--synthetic",
        metavar="SIZE",
        default=None,
        help="bench a random-weight llama of SIZE parameters (e.g. 1B), written once into the "
        "cache, with the tokenizer of --model",
    )

    doctor = commands.add_parser("doctor", help="this machine's engine profile and its probes")
    _add_common(doctor)
    _add_model(doctor)
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.add_argument("--remeasure", action="store_true", help="probe again, ignore the cache")
    doctor.add_argument("--threads", type=int, default=None, metavar="N")

    model = commands.add_parser("model", help="model store: pull, list, info")
    _add_common(model)
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    pull = model_commands.add_parser("pull", help="fetch the default model")
    _add_common(pull)
    lst = model_commands.add_parser("list", help="models in the store")
    _add_common(lst)
    rm = model_commands.add_parser("rm", help="delete seeded slices (layers from peers)")
    _add_common(rm)
    rm.add_argument("name", metavar="NAME", help="a seeded file name, a fingerprint prefix, or all")
    info = model_commands.add_parser("info", help="what is in a GGUF file")
    _add_common(info)
    info.add_argument("path", metavar="PATH", nargs="?")
    return parser


def _dispatch(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    # Imports are local so `meshchat --headless` never pulls in textual.
    if args.command == "generate":
        from meshchat.commands.generate import run_generate

        return run_generate
    if args.command == "bench":
        from meshchat.commands.bench import run_bench

        return run_bench
    if args.command == "doctor":
        from meshchat.commands.doctor import run_doctor

        return run_doctor
    if args.command == "model":
        from meshchat.commands.model import run_model

        return run_model
    if args.headless:
        from meshchat.headless import run_headless

        return run_headless
    from meshchat.tui.launch import run_tui

    return run_tui


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    polling.install()  # before any event loop exists
    with stops.term_as_interrupt():
        code = _run(argv, debug)
        return stops.leave(code)  # never exit while llama.cpp still computes (meshchat.stops)


def _run(argv: list[str], debug: bool) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args)(args)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (meshchat.stops)
        return stops.stop_code(headless="--headless" in argv)
    except BrokenPipeError:
        return 0
    except MeshchatError as exc:
        if debug:
            traceback.print_exc()
        print(f"meshchat: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            print(
                f"meshchat: internal error: {exc!r} (run with --debug for details)", file=sys.stderr
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
