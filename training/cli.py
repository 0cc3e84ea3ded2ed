"""``train-adapter``: the command line. Parses flags into TrainConfig objects, runs the trainer (or
the search, or an eval-only scoring), prints the summary table and the verdict of each adapter in
words; every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys


def quiet_libraries() -> None:
    """Third-party noise off for our command lines (training may not import server.logs): log
    levels of transformers/datasets/bitsandbytes to errors, and two narrow warnings that say
    nothing to a user (peft asking the Hub about a local base; a transformers rename peft calls)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"Unable to fetch remote file due to the following error", category=UserWarning, module=r"peft\.utils\.other")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        from datasets.utils import logging as ds_logging

        ds_logging.set_verbosity_error()
        ds_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


def main(argv: list[str] | None = None) -> int:
    from loraplex.server.errors import LoraplexError
    from loraplex.training.config import parse_command

    try:
        command = parse_command(argv)
    except LoraplexError as exc:
        print(f"train-adapter: error: {exc}", file=sys.stderr)
        return 2
    quiet_libraries()
    from rich.console import Console

    from loraplex.training.report import summary_table, verdict_lines

    console = Console(width=None if sys.stdout.isatty() else 140)
    try:
        if command.search is not None:
            from loraplex.training.search import run_search

            results = [run_search(command.configs[0], command.search, console)]
        else:
            from loraplex.training.trainer import train_all

            results = train_all(command.configs)
    except LoraplexError as exc:
        print(f"train-adapter: error: {exc}", file=sys.stderr)
        return 2
    console.print(summary_table(results))
    for line in verdict_lines(results):
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
