"""``train-adapter``: the command line. Parses flags into TrainConfig objects, runs the
trainer, prints the summary table; every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    from loraplex.server.errors import LoraplexError
    from loraplex.training.config import configs_from_argv

    try:
        configs = configs_from_argv(argv)
    except LoraplexError as exc:
        print(f"train-adapter: error: {exc}", file=sys.stderr)
        return 2
    _quiet_libraries()
    from rich.console import Console

    from loraplex.training.report import summary_table
    from loraplex.training.trainer import train_all

    try:
        results = train_all(configs)
    except LoraplexError as exc:
        print(f"train-adapter: error: {exc}", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(summary_table(results))
    for r in results:
        console.print(f"published {r.name} -> {r.path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
