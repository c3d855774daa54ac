"""The ``he-models`` command line (the slow ``train`` path is covered by the artifact tests)."""

from __future__ import annotations

import pytest

from models.cli import main


def test_unknown_model_exits_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "no-such-model"]) == 2
    captured = capsys.readouterr()
    assert "unknown model 'no-such-model'" in captured.err
    assert "mnist-cnn" in captured.err
    assert "Traceback" not in captured.err


def test_list_names_the_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    assert capsys.readouterr().out.startswith("mnist-cnn ")


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: he-models" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    assert "--seed" in capsys.readouterr().out
