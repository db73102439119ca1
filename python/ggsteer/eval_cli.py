"""`ggsteer eval` and `ggsteer calibrate` (placeholder until the evaluation commands land)."""


def add_eval_commands(subparsers) -> None:
    """Register the evaluation subcommands on the `ggsteer` parser."""
