"""gilib.notebooks: the chapters' shared parts (Colab badge, install cell, repository) and the README's figure."""

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import pytest
import yaml

from gilib import notebooks, plots

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def outside_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)


@pytest.fixture
def in_colab(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))


def test_every_chapter_has_its_badge_and_install_cell():
    chapters = notebooks.chapter_notebooks()
    assert len(chapters) >= 4
    problems = [p for path in chapters for p in notebooks.check_chapter(path)]
    assert problems == []


def test_badges_point_at_the_repository_of_the_config_and_at_the_notebook_itself():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url, branch = config["repository"]["url"], config["repository"]["branch"]
    assert url.startswith("https://github.com/")
    for path in notebooks.chapter_notebooks():
        nb = nbformat.read(str(path), as_version=4)
        rel = path.relative_to(ROOT).as_posix()
        expected = f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/{branch}/{rel}"
        assert f"]({expected})" in nb.cells[0].source, rel


def test_check_and_sync_repair_a_wrong_badge_and_a_missing_install_cell(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    nb = nbformat.read(str(ROOT / "chapters" / "01_full_model_inversion.ipynb"), as_version=4)
    nb.cells[0].source = nb.cells[0].source.replace("gilib-book/partial-gradient-leakage", "someone/else")
    del nb.cells[notebooks._install_cell_index(nb)]
    copy = tmp_path / "chapters" / "01_copy.ipynb"
    nbformat.write(nb, str(copy))
    problems = notebooks.check_chapter(copy, root=tmp_path)
    assert any("Colab badge" in p for p in problems) and any("install cell" in p for p in problems)
    assert notebooks.sync_chapter(copy, root=tmp_path)
    assert notebooks.check_chapter(copy, root=tmp_path) == []
    assert not notebooks.sync_chapter(copy, root=tmp_path)  # idempotent
    assert "blob/main/chapters/01_copy.ipynb" in nbformat.read(str(copy), as_version=4).cells[0].source


def test_the_install_cell_does_nothing_outside_colab(outside_colab, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command outside Colab"))
    path_before = list(sys.path)
    exec(notebooks.colab_install_source(), {})
    assert sys.path == path_before


def test_the_install_cell_in_colab_clones_the_repository_and_installs_gilib(in_colab, monkeypatch):
    commands, moved = [], []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: commands.append(cmd))
    monkeypatch.setattr(os.path, "isdir", lambda p: False)
    monkeypatch.setattr(os, "chdir", moved.append)
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(notebooks.colab_install_source(), {})
    url, branch = notebooks.repository()
    clone = "/content/partial-gradient-leakage"
    assert commands[0] == ["git", "clone", "--depth", "1", "--branch", branch, url, clone]
    assert commands[1][1:] == ["-m", "pip", "install", "--quiet", "-e", clone, "datasets"]
    assert sys.path[0] == clone and moved == [f"{clone}/chapters"]


def test_readme_names_the_same_repository_and_colab_links():
    readme = (ROOT / "README.md").read_text()
    url, _ = notebooks.repository()
    assert url in readme
    repos = set(re.findall(r"github\.com/([\w.-]+/[\w.-]+)", readme))
    assert repos == {url.removeprefix("https://github.com/")}
    for path in notebooks.chapter_notebooks():
        assert notebooks.colab_url(path.relative_to(ROOT).as_posix()) in readme


def test_threat_model_figure_is_what_the_code_draws(tmp_path):
    drawn = notebooks.save_threat_model(tmp_path / "threat_model.png")  # (switches matplotlib to Agg)
    committed = ROOT / "docs" / "threat_model.png"
    assert drawn.read_bytes() == committed.read_bytes(), "redraw it with `make figures`"
    assert "docs/threat_model.png" in (ROOT / "README.md").read_text()
    ax = plots.threat_model()
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "client (victim)" in texts and "server (attacker)" in texts and "DP-SGD" in texts
    assert not ax.axison
    plt.close("all")


def test_the_command_line_checks_the_chapters(capsys):
    assert notebooks.main(["check"]) == 0
    assert "every chapter has its Colab badge and install cell" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        notebooks.main(["no-such-command"])
