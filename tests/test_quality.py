"""Lint, format and type checks run as part of the suite, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["he_service", "clients", "models"]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", *PACKAGES, "tests", "benchmarks"],
        ["ruff", "format", "--check", *PACKAGES, "tests", "benchmarks"],
        [sys.executable, "-m", "mypy", *PACKAGES],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_code_quality(command: list[str]) -> None:
    if command[0] == "ruff":
        command[0] = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("\n", 1)[1].strip() for b in readme.split("```")[1::2]]
    assert "he-client demo" in blocks[0]
    assert "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1] in ci
