"""The `ggsteer` command: one module per subcommand, each registering its own parser."""

from __future__ import annotations

import argparse
import sys
import warnings

from ggsteer import __version__
from ggsteer.cli import bake, chat, demo, evaluate, export, generate, inspect, rpc_server, serve, train, tune
from ggsteer.cli.common import CliError
from ggsteer.extras import MissingExtraError
from ggsteer.generation import SequenceError
from ggsteer.train import DatasetError
from ggsteer.vectors import VectorFileError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
SUBCOMMANDS = (demo, train, inspect, generate, chat, export, evaluate, tune, serve, bake, rpc_server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ggsteer",
        description="Control vectors for llama.cpp models: train them, save them as GGUF, steer generation.",
    )
    parser.add_argument("--version", action="version", version=f"ggsteer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001 - showwarning's
    """Warnings as one clean line (not Python's two lines with source code)."""
    print(f"ggsteer: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return run(args)


def run(args) -> int:
    """Run a parsed command: its warnings as one line, its errors as one line and status EXIT_ERROR."""
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print("\nggsteer: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (CliError, DatasetError, VectorFileError, MissingExtraError, ValueError, OSError,
                SequenceError) as error:
            print(f"ggsteer: error: {one_line(error)}", file=sys.stderr)
            return EXIT_ERROR


def one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
