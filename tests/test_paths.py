"""Paths as a user types them (tclab.paths): the caller's folder, JupyterLab's repository root, built-in names."""

from __future__ import annotations

import pytest

from tclab import paths
from tclab.data import load_image_folder
from tclab.models import ModelSpecError, load_dit


def test_relative_paths_are_read_from_the_callers_folder(tmp_path, monkeypatch):
    (tmp_path / "caller" / "set").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the kernel's working directory (the notebook's folder)
    monkeypatch.setenv(paths.CALLER_CWD_ENV, str(tmp_path / "caller"))
    assert paths.resolve_path("set") == tmp_path / "caller" / "set"
    with pytest.raises(paths.PathNotFoundError, match=r"image folder 'nope' not found: looked at .*caller/nope "
                                                      r"\(relative paths are read from the folder `tclab run` was called"):
        paths.resolve_images("nope")
    monkeypatch.delenv(paths.CALLER_CWD_ENV)
    with pytest.raises(paths.PathNotFoundError, match="read from the working directory"):
        paths.resolve_path("set")
    assert paths.resolve_path(str(tmp_path / "caller" / "set")) == tmp_path / "caller" / "set"  # absolute: as is


def test_in_the_checkouts_notebooks_folder_paths_are_read_from_the_repository_root(monkeypatch):
    root = paths.repo_root()
    assert root is not None and (root / "pyproject.toml").is_file()
    monkeypatch.delenv(paths.CALLER_CWD_ENV, raising=False)
    monkeypatch.chdir(root / "notebooks")  # where JupyterLab runs a notebook it opened
    base, why = paths.base_dir()
    assert base == root and "repository root" in why
    assert paths.resolve_path("data/shapes") == root / "data" / "shapes"


def test_shapes_is_the_stand_in_set_from_anywhere_and_is_made_without_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    committed = paths.resolve_images("shapes")
    assert committed == paths.repo_root() / "data" / "shapes"
    monkeypatch.setattr(paths, "repo_root", lambda: None)  # as if installed without the checkout
    monkeypatch.setenv("TCLAB_HOME", str(tmp_path / "home"))
    made = paths.resolve_images("shapes")
    assert made == tmp_path / "home" / "data" / "shapes"
    assert load_image_folder(made, 32).manifest_hash() == load_image_folder(committed, 32).manifest_hash()


def test_a_model_folder_is_looked_up_where_the_user_is_and_the_error_says_where(tmp_path, monkeypatch):
    from tests.standins import write_transformer_folder

    write_transformer_folder(tmp_path / "models" / "dit", sample_size=8)
    monkeypatch.chdir(tmp_path / "models")
    assert load_dit("dit").token_grid == (4, 4)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSpecError, match=rf"looked for a folder at {tmp_path}/dit \(relative paths are read from "
                                             "the working directory"):
        load_dit("dit")


def test_the_environment_variables_are_named_once_and_still_importable_from_their_old_homes():
    from tclab import artefacts, data, env, progress

    assert paths.CALLER_CWD_ENV is env.CALLER_CWD_ENV == "TCLAB_CALLER_CWD"
    assert progress.PROGRESS_FILE_ENV is env.PROGRESS_FILE_ENV
    assert artefacts.HOME_ENV is env.HOME_ENV == "TCLAB_HOME"
    assert data.MAX_PIXELS_ENV is env.MAX_PIXELS_ENV
    assert artefacts.tclab_home is paths.tclab_home
