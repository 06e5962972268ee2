"""gilib.book.upkeep: the chapters' shared parts (Colab badge, install cell, repository) and the README's figure."""

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

from gilib.book import plots, upkeep

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def outside_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)


@pytest.fixture
def in_colab(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))


def test_every_chapter_has_its_badge_and_install_cell():
    chapters = upkeep.chapter_notebooks()
    assert len(chapters) >= 4
    problems = [p for path in chapters for p in upkeep.check_chapter(path)]
    assert problems == []


def test_badges_point_at_the_repository_of_the_config_and_at_the_notebook_itself():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url, branch = config["repository"]["url"], config["repository"]["branch"]
    assert url.startswith("https://github.com/")
    for path in upkeep.chapter_notebooks():
        nb = nbformat.read(str(path), as_version=4)
        rel = path.relative_to(ROOT).as_posix()
        expected = f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/{branch}/{rel}"
        assert f"]({expected})" in nb.cells[0].source, rel


def test_check_and_sync_repair_a_wrong_badge_and_a_missing_install_cell(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    nb = nbformat.read(str(ROOT / "chapters" / "01_full_model_inversion.ipynb"), as_version=4)
    nb.cells[0].source = nb.cells[0].source.replace("gilib-book/partial-gradient-leakage", "someone/else")
    del nb.cells[upkeep._install_cell_index(nb)]
    copy = tmp_path / "chapters" / "01_copy.ipynb"
    nbformat.write(nb, str(copy))
    problems = upkeep.check_chapter(copy, root=tmp_path)
    assert any("Colab badge" in p for p in problems) and any("install cell" in p for p in problems)
    assert upkeep.sync_chapter(copy, root=tmp_path)
    assert upkeep.check_chapter(copy, root=tmp_path) == []
    assert not upkeep.sync_chapter(copy, root=tmp_path)  # idempotent
    assert "blob/main/chapters/01_copy.ipynb" in nbformat.read(str(copy), as_version=4).cells[0].source


def test_the_install_cell_does_nothing_outside_colab(outside_colab, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command outside Colab"))
    path_before = list(sys.path)
    exec(upkeep.colab_install_source(), {})
    assert sys.path == path_before


def test_the_install_cell_in_colab_clones_the_repository_and_installs_gilib(in_colab, monkeypatch):
    commands, moved = [], []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: commands.append(cmd))
    monkeypatch.setattr(os.path, "isdir", lambda p: False)
    monkeypatch.setattr(os, "chdir", moved.append)
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(upkeep.colab_install_source(), {})
    url, branch = upkeep.repository()
    clone = "/content/partial-gradient-leakage"
    assert commands[0] == ["git", "clone", "--depth", "1", "--branch", branch, url, clone]
    assert commands[1][1:] == ["-m", "pip", "install", "--quiet", "-e", clone, "datasets"]
    assert sys.path[0] == clone and moved == [f"{clone}/chapters"]


def test_readme_names_the_same_repository_and_colab_links():
    readme = (ROOT / "README.md").read_text()
    url, _ = upkeep.repository()
    assert url in readme
    repos = set(re.findall(r"github\.com/([\w.-]+/[\w.-]+)", readme))
    assert repos == {url.removeprefix("https://github.com/")}
    for path in upkeep.chapter_notebooks():
        assert upkeep.colab_url(path.relative_to(ROOT).as_posix()) in readme


def test_threat_model_figure_is_what_the_code_draws(tmp_path):
    drawn = upkeep.save_threat_model(tmp_path / "threat_model.png")  # (switches matplotlib to Agg)
    committed = ROOT / "docs" / "threat_model.png"
    assert drawn.read_bytes() == committed.read_bytes(), "redraw it with `make figures`"
    assert "docs/threat_model.png" in (ROOT / "README.md").read_text()
    ax = plots.threat_model()
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "client (victim)" in texts and "server (attacker)" in texts and "DP-SGD" in texts
    # One picture for every chapter: what is shared, the defence, the round, what the server knows.
    for shown in ("all parameters (ch. 1)", "one layer (ch. 2)", "one linear weight", "adapters",
                  "FedAvg", "SecAgg", "local or central DP", "label $y$", "token count $n$"):
        assert shown in texts, shown
    assert not ax.axison
    plt.close("all")


def test_the_command_line_checks_the_chapters(capsys):
    assert upkeep.main(["check"]) == 0
    assert "every chapter has its Colab badge and install cell" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        upkeep.main(["no-such-command"])


OLD, NEW = "gilib-book/partial-gradient-leakage", "New-Owner/moved.book"


@pytest.fixture
def book_copy(tmp_path):
    """A book root with the files that name the repository: _config.yml, README.md, CITATION.cff, a chapter."""
    (tmp_path / "chapters").mkdir()
    for name in ("_config.yml", "README.md", "CITATION.cff", "chapters/01_full_model_inversion.ipynb"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    return tmp_path


def _move_repository(root, url, branch="main"):
    """Point the copy's _config.yml at another repository, as a maintainer would edit it."""
    config = root / "_config.yml"
    text = config.read_text()
    assert f"url: https://github.com/{OLD}\n" in text and "branch: main\n" in text
    config.write_text(text.replace(f"url: https://github.com/{OLD}\n", f"url: {url}\n")
                      .replace("branch: main\n", f"branch: {branch}\n"))


def test_the_files_that_name_the_repository_are_checked_and_agree():
    assert upkeep.repository_files() == [ROOT / "README.md", ROOT / "CITATION.cff"]
    assert [p for path in upkeep.repository_files() for p in upkeep.check_repository_links(path)] == []
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["repository-code"] == upkeep.repository()[0]


def test_sync_carries_a_new_repository_url_into_readme_citation_and_chapters(book_copy, capsys):
    assert upkeep.check(book_copy) == []  # the copy starts as consistent as the repository
    readme, cff = (book_copy / "README.md").read_text(), (book_copy / "CITATION.cff").read_text()
    _move_repository(book_copy, f"https://github.com/{NEW}", branch="trunk")

    problems = upkeep.check(book_copy)
    off = {p.split(":")[0] for p in problems}
    assert off == {"README.md", "CITATION.cff", "chapters/01_full_model_inversion.ipynb"}
    # The README's repository line and its BibTeX entry, by line number, and the Colab table.
    lines = readme.splitlines()
    for i in (n for n, line in enumerate(lines, 1) if f"https://github.com/{OLD}" in line):
        assert any(p.startswith(f"README.md:{i}: https://github.com/{OLD} ") for p in problems), i
    colab = sum(p.startswith("README.md:") and "colab.research.google.com" in p for p in problems)
    assert colab == len(upkeep.chapter_notebooks(ROOT))  # one per chapter row
    assert any("CITATION.cff: repository-code is" in p for p in problems)

    assert upkeep.main(["sync", "--root", str(book_copy)]) == 0
    assert capsys.readouterr().out.split() == ["updated", "chapters/01_full_model_inversion.ipynb",
                                               "updated", "README.md", "updated", "CITATION.cff"]
    # Only the links changed: the rest of both files is the same to the byte.
    # The Pages address follows too: https://<owner>.github.io/<name>/ (GitHub lowercases the owner).
    old_owner, old_name = OLD.split("/")
    new_owner, new_name = NEW.split("/")
    expected = (readme.replace(OLD, NEW).replace("/blob/main/", "/blob/trunk/")
                .replace(f"{old_owner}.github.io/{old_name}", f"{new_owner.lower()}.github.io/{new_name}"))
    assert (book_copy / "README.md").read_text() == expected
    assert (book_copy / "CITATION.cff").read_text() == cff.replace(OLD, NEW)
    assert yaml.safe_load((book_copy / "CITATION.cff").read_text())["repository-code"] == f"https://github.com/{NEW}"
    nb = nbformat.read(str(book_copy / "chapters" / "01_full_model_inversion.ipynb"), as_version=4)
    colab = f"https://colab.research.google.com/github/{NEW}/blob/trunk/chapters/01_full_model_inversion.ipynb"
    assert f"]({colab})" in nb.cells[0].source
    assert f'REPO_URL = "https://github.com/{NEW}"' in nb.cells[upkeep._install_cell_index(nb)].source
    assert 'CLONE = "/content/moved.book"' in nb.cells[upkeep._install_cell_index(nb)].source

    assert upkeep.check(book_copy) == []
    assert upkeep.main(["check", "--root", str(book_copy)]) == 0
    assert upkeep.sync(book_copy) == []  # idempotent


def test_check_catches_a_file_that_drifted_on_its_own_and_sync_repairs_it(book_copy):
    readme = book_copy / "README.md"
    before = readme.read_text()
    bibtex = f"\\url{{https://github.com/{OLD}}}"
    assert before.count(bibtex) == 1
    readme.write_text(before.replace(bibtex, "\\url{https://github.com/someone/else.git}"))
    cff = book_copy / "CITATION.cff"
    cff.write_text(cff.read_text().replace(OLD, "someone/else"))
    line = before[:before.index(bibtex)].count("\n") + 1
    problems = upkeep.check(book_copy)
    assert problems == [
        f"README.md:{line}: https://github.com/someone/else.git is not the repository of _config.yml "
        f"(https://github.com/{OLD}.git)",
        f"CITATION.cff:7: https://github.com/someone/else is not the repository of _config.yml "
        f"(https://github.com/{OLD})",
        f"CITATION.cff: repository-code is 'https://github.com/someone/else', not 'https://github.com/{OLD}'",
    ]
    assert upkeep.main(["check", "--root", str(book_copy)]) == 1
    assert upkeep.sync(book_copy) == [readme, cff]
    # A ".git" suffix is kept: the link still clones.
    assert readme.read_text() == before.replace(bibtex, f"\\url{{https://github.com/{OLD}.git}}")
    assert upkeep.check(book_copy) == []


def test_every_kind_of_link_is_rewritten_and_what_follows_the_name_kept(book_copy):
    _move_repository(book_copy, f"https://github.com/{NEW}/", branch="trunk")  # a trailing slash is fine
    readme = book_copy / "README.md"
    readme.write_text(
        "Code: https://github.com/old/repo. Clone https://github.com/old/repo.git; issues at\n"
        "<https://github.com/old/my.repo/issues>. The book: https://Old.github.io/repo/chapters/intro.html\n"
        "[open](https://colab.research.google.com/github/old/repo/blob/dev/chapters/x.ipynb).\n"
        "Not GitHub: https://colab.research.google.com/assets/colab-badge.svg, https://jupyterbook.org/\n"
    )
    assert len(upkeep.check_repository_links(readme, book_copy)) == 5
    assert upkeep.sync_repository_links(readme, book_copy)
    assert readme.read_text() == (
        f"Code: https://github.com/{NEW}. Clone https://github.com/{NEW}.git; issues at\n"
        f"<https://github.com/{NEW}/issues>. The book: https://new-owner.github.io/moved.book/chapters/intro.html\n"
        f"[open](https://colab.research.google.com/github/{NEW}/blob/trunk/chapters/x.ipynb).\n"
        "Not GitHub: https://colab.research.google.com/assets/colab-badge.svg, https://jupyterbook.org/\n"
    )
    assert upkeep.check_repository_links(readme, book_copy) == []
    assert upkeep.pages_url(book_copy) == "https://new-owner.github.io/moved.book/"
    readme.write_text("No link to the repository here.\n")
    assert upkeep.check_repository_links(readme, book_copy) == ["README.md: names the repository nowhere"]
