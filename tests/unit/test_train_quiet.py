"""train-adapter's third-party quieting (training/cli.py ``quiet_libraries``) drops the two narrow
warnings and keeps unrelated ones, in a fresh interpreter as the CLI runs it."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, warnings
if sys.argv[1] == "quiet":
    from loraplex.training.cli import quiet_libraries
    quiet_libraries()
warnings.warn_explicit("Unable to fetch remote file due to the following error boom", UserWarning, "other.py", 1, module="peft.utils.other")
warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
warnings.warn_explicit("an unrelated peft warning", UserWarning, "other.py", 2, module="peft.utils.other")
"""


def _stderr(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True).stderr


def test_training_cli_drops_only_the_named_noise():
    loud, quiet = _stderr("loud"), _stderr("quiet")
    for line in ("Unable to fetch remote file", "`is_gradient_checkpointing` is deprecated"):
        assert line in loud and line not in quiet, (line, quiet)
    assert "an unrelated peft warning" in quiet
