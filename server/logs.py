"""Readable logs: third-party start-up noise dropped narrowly (one logger and one message each,
never a whole library), installed once by the CLIs before the libraries are imported.

What is dropped, and why it is noise here:

- bitsandbytes ``Failed to load CPU gemm_4bit_forward from kernels-community``: an optional
  faster CPU kernel from the Hub; bitsandbytes falls back to its own kernel (and the server never
  downloads code).
- transformers ``past_key_values`/cache_params are deprecated`` (logger) and the matching
  ``FutureWarning`` from ``LlamaForCausalLM.forward``: a rename announced for a later
  transformers; the engine's calls are correct for the pinned version.
- peft ``Unable to fetch remote file ... config.json``: peft asking the Hub about a base that is a
  local folder (``save_embedding_layers="auto"``); loraplex never targets embedding layers.
- ``Loading weights`` progress bars of transformers in ``serve`` (a server log is not a terminal).

It knows logging and warnings and nothing of the server.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: (logger name, start of the message) pairs that are dropped
NOISY_LOGS: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("transformers.utils.generic", "`past_key_values`/`cache_params` are deprecated"),
)
#: (message regex, category, module regex) of Python warnings that are ignored
NOISY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"`past_key_values` is deprecated and will be removed", FutureWarning, r"torch\.nn\.modules\.module"),
    (r"Unable to fetch remote file due to the following error", UserWarning, r"peft\.utils\.other"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_installed = False


def quiet_third_party(*, progress_bars: bool = True) -> None:
    """Install the filters (idempotent); ``progress_bars=False`` also turns off Hub/transformers bars."""
    global _installed
    if not progress_bars:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers is imported
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    if _installed:
        return
    _installed = True
    for name, prefix in NOISY_LOGS:
        logging.getLogger(name).addFilter(_DropPrefix(prefix))
    for message, category, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
