"""The `ggsteer` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from ggsteer import __version__

    parser = argparse.ArgumentParser(
        prog="ggsteer",
        description="Control vectors for llama.cpp models: train them, save them as GGUF, steer generation.",
    )
    parser.add_argument("--version", action="version", version=f"ggsteer {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
