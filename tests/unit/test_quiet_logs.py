"""Third-party start-up noise is dropped narrowly (server/logs.py), in a fresh interpreter as the
CLI runs it: the same lines print without the filters and not with them, and an unrelated
warning from the same libraries still prints."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, warnings, sys
if sys.argv[1] == "quiet":
    from loraplex.server.logs import quiet_third_party
    quiet_third_party()
import bitsandbytes  # noqa: F401  (prints the gemm_4bit_forward line on AVX-512 bf16 CPUs)
warnings.warn_explicit("Unable to fetch remote file due to the following error boom", UserWarning, "other.py", 1, module="peft.utils.other")
warnings.warn_explicit("`past_key_values` is deprecated and will be removed in version 5.40.0", FutureWarning, "module.py", 1, module="torch.nn.modules.module")
logging.getLogger("transformers.utils.generic").warning("`past_key_values`/`cache_params` are deprecated. Use `cache` instead.")
logging.getLogger("transformers.utils.generic").warning("an unrelated transformers warning")
warnings.warn_explicit("an unrelated peft warning", UserWarning, "other.py", 2, module="peft.utils.other")
"""
NOISE = ("Unable to fetch remote file", "`past_key_values` is deprecated", "`cache_params` are deprecated")


def _stderr(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True).stderr


def test_noise_is_dropped_and_nothing_else():
    loud, quiet = _stderr("loud"), _stderr("quiet")
    for line in NOISE:
        assert line in loud and line not in quiet, (line, quiet)
    if "gemm_4bit_forward" in loud:  # only CPUs with AVX-512 bf16 print it
        assert "gemm_4bit_forward" not in quiet
    assert "an unrelated transformers warning" in quiet and "an unrelated peft warning" in quiet
