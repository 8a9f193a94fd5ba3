"""The ``bastion distill lm`` call that test_lm.py and test_ddp.py share: stories260K from ../shared as teacher.

One place names the teacher, its tokenizer and the licence, so each test only says what it varies.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import SHARED, run_cli

STORIES = SHARED / "weights" / "stories260K"


def stories_teacher() -> Path:
    """The stories260K folder; skips the test without torch or without ../shared."""
    pytest.importorskip("torch")
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip("../shared is not present")
    return STORIES


def distill_lm(*args: str, tokenizer: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``bastion distill lm`` with stories260K as the teacher, its tokenizer and the MIT licence, plus ``args``."""
    return run_cli(
        "distill",
        "lm",
        "--teacher",
        str(STORIES / "stories260K.bin"),
        "--tokenizer",
        str(tokenizer or STORIES / "hf" / "tokenizer.json"),
        "--weights-license",
        "MIT",
        *args,
        env=env,
    )
