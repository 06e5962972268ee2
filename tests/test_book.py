import nbformat
import pytest
from nbclient import NotebookClient

from gilib.book import fast_mode, pick, read_records


def test_fast_mode_follows_the_environment(monkeypatch):
    monkeypatch.delenv("GILIB_FAST_MODE", raising=False)
    assert fast_mode()
    monkeypatch.setenv("GILIB_FAST_MODE", "0")
    assert not fast_mode()
    monkeypatch.setenv("GILIB_FAST_MODE", "1")
    assert fast_mode()


def test_pick_prefers_an_explicit_value():
    assert pick(None, 2, 10, fast_mode=True) == 2
    assert pick(None, 2, 10, fast_mode=False) == 10
    assert pick(5, 2, 10, fast_mode=True) == 5


def test_records_round_trip_through_an_executed_notebook():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import numpy as np\n"
        "from gilib.book import record\n"
        "record('score', np.float64(0.25))\n"
        "record('texts', {'a/0': 'the film'})\n"
        "record('curve', [np.float32(1.5), 2])"
    )]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    assert read_records(nb) == {"score": 0.25, "texts": {"a/0": "the film"}, "curve": [1.5, 2]}


# --------------------------------------------------------------------------- #
# Online or offline: the chapters' setup.
# --------------------------------------------------------------------------- #

import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from gilib import book  # noqa: E402
from gilib.book import Setup, choose_setup, load_sentences  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _never():
    raise AssertionError("the hub must not be asked when the chapter stays offline")


@pytest.fixture
def outside_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delenv("GILIB_ONLINE", raising=False)


@pytest.fixture
def in_colab(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.delenv("GILIB_ONLINE", raising=False)


def test_the_default_outside_colab_is_offline_without_asking_the_hub(outside_colab):
    setup = choose_setup(reachable=_never, device="cpu")
    assert (setup.online, setup.model, setup.dataset) == (False, "minilm", "sample")
    assert "offline default" in setup.reason


def test_colab_with_the_hub_goes_online(in_colab):
    setup = choose_setup(reachable=lambda: True, device="cpu")
    assert (setup.online, setup.model, setup.dataset) == (True, "bert-base-uncased", "cola")
    assert str(setup).startswith("online: model 'bert-base-uncased'")


def test_colab_without_the_hub_falls_back_to_the_offline_default(in_colab):
    setup = choose_setup(reachable=lambda: False, device="cpu")
    assert (setup.online, setup.model, setup.dataset) == (False, "minilm", "sample")
    assert "not reachable" in setup.reason


def test_explicit_choices_win(outside_colab, monkeypatch):
    assert not choose_setup(False, reachable=_never, device="cpu").online
    assert choose_setup(True, reachable=lambda: True, device="cpu").online
    assert not choose_setup(True, reachable=lambda: False, device="cpu").online
    setup = choose_setup(True, "tiny", "sst2", "cpu", reachable=lambda: True)
    assert (setup.model, setup.dataset, setup.device) == ("tiny", "sst2", "cpu")
    # Chapters whose live sweep stays on the bundled sample pass it explicitly.
    assert choose_setup(True, dataset="sample", reachable=lambda: True, device="cpu").dataset == "sample"
    monkeypatch.setenv("GILIB_ONLINE", "1")
    assert choose_setup(reachable=lambda: True, device="cpu").online


def test_the_real_hub_check_respects_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert book.hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert isinstance(book.hub_reachable(timeout=1.0), bool)


def test_load_sentences_offline_reads_local_files():
    setup = Setup(online=False, model="minilm", dataset="sample", device="cpu", reason="")
    sentences = load_sentences(setup)
    assert len(sentences) > 10 and sentences[0].dataset == "sample"
    # The bundled sample is local even online; the benchmarks come from the hub.
    assert load_sentences(Setup(True, "bert-base-uncased", "sample", "cpu", "")) == sentences


def test_load_sentences_online_reads_the_hub(monkeypatch):
    import gilib.data

    calls = []
    monkeypatch.setattr(gilib.data, "load_hub_split", lambda d, s="train": calls.append((d, s)) or ["row"])
    assert load_sentences(Setup(True, "bert-base-uncased", "cola", "cpu", "")) == ["row"]
    assert calls == [("cola", "train")]


# --------------------------------------------------------------------------- #
# The chapters' shared parts: Colab badge, install cell, repository.
# --------------------------------------------------------------------------- #


def test_every_chapter_has_its_badge_and_install_cell():
    chapters = book.chapter_notebooks()
    assert len(chapters) >= 4
    problems = [p for path in chapters for p in book.check_chapter(path)]
    assert problems == []


def test_badges_point_at_the_repository_of_the_config_and_at_the_notebook_itself():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url, branch = config["repository"]["url"], config["repository"]["branch"]
    assert url.startswith("https://github.com/")
    for path in book.chapter_notebooks():
        nb = nbformat.read(str(path), as_version=4)
        rel = path.relative_to(ROOT).as_posix()
        expected = f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/{branch}/{rel}"
        assert f"]({expected})" in nb.cells[0].source, rel


def test_check_and_sync_repair_a_wrong_badge_and_a_missing_install_cell(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    nb = nbformat.read(str(ROOT / "chapters" / "01_full_model_inversion.ipynb"), as_version=4)
    nb.cells[0].source = nb.cells[0].source.replace("gilib-book/partial-gradient-leakage", "someone/else")
    del nb.cells[book._install_cell_index(nb)]
    copy = tmp_path / "chapters" / "01_copy.ipynb"
    nbformat.write(nb, str(copy))
    problems = book.check_chapter(copy, root=tmp_path)
    assert any("Colab badge" in p for p in problems) and any("install cell" in p for p in problems)
    assert book.sync_chapter(copy, root=tmp_path)
    assert book.check_chapter(copy, root=tmp_path) == []
    assert not book.sync_chapter(copy, root=tmp_path)  # idempotent
    assert "blob/main/chapters/01_copy.ipynb" in nbformat.read(str(copy), as_version=4).cells[0].source


def test_the_install_cell_does_nothing_outside_colab(outside_colab, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command outside Colab"))
    path_before = list(sys.path)
    exec(book.colab_install_source(), {})
    assert sys.path == path_before


def test_the_install_cell_in_colab_clones_the_repository_and_installs_gilib(in_colab, monkeypatch):
    import os
    import subprocess

    commands, moved = [], []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: commands.append(cmd))
    monkeypatch.setattr(os.path, "isdir", lambda p: False)
    monkeypatch.setattr(os, "chdir", moved.append)
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(book.colab_install_source(), {})
    url, branch = book.repository()
    clone = "/content/partial-gradient-leakage"
    assert commands[0] == ["git", "clone", "--depth", "1", "--branch", branch, url, clone]
    assert commands[1][1:] == ["-m", "pip", "install", "--quiet", "-e", clone, "datasets"]
    assert sys.path[0] == clone and moved == [f"{clone}/chapters"]


def test_readme_names_the_same_repository_and_colab_links():
    import re

    readme = (ROOT / "README.md").read_text()
    url, _ = book.repository()
    assert url in readme
    repos = set(re.findall(r"github\.com/([\w.-]+/[\w.-]+)", readme))
    assert repos == {url.removeprefix("https://github.com/")}
    for path in book.chapter_notebooks():
        assert book.colab_url(path.relative_to(ROOT).as_posix()) in readme


# --------------------------------------------------------------------------- #
# The book's configuration, pages and figure.
# --------------------------------------------------------------------------- #


def test_config_has_launch_buttons_bibliography_and_strict_execution():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["title"] and config["author"]
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert config["bibtex_bibfiles"] == ["references.bib"]
    assert config["execute"]["execute_notebooks"] == "force"
    assert config["execute"]["allow_errors"] is False
    assert config["sphinx"]["config"]["nb_execution_raise_on_error"] is True


def test_bibliography_holds_the_papers_the_book_builds_on():
    bib = (ROOT / "references.bib").read_text()
    for key in ("zhu2019dlg", "deng2021tag", "balunovic2022lamp", "li2024forest", "petrov2024dager",
                "yousefpour2021opacus", "abadi2016dpsgd"):
        assert f"{{{key}," in bib, key


def test_toc_orders_intro_chapters_conclusion_references_and_run_times():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for c in toc["chapters"]]
    assert toc["root"] == "chapters/intro"
    assert files.index("chapters/04_dp_defence") < files.index("chapters/conclusion") < files.index("chapters/references")
    assert "chapters/runtimes" in files
    assert "{nb-exec-table}" in (ROOT / "chapters" / "runtimes.md").read_text()
    for page in ("intro", "conclusion"):  # executed pages: their numbers and figure come from code
        assert "{code-cell}" in (ROOT / "chapters" / f"{page}.md").read_text()


def test_threat_model_figure_is_what_the_code_draws(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gilib import plots

    ax = plots.threat_model()
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "client (victim)" in texts and "server (attacker)" in texts and "DP-SGD" in texts
    assert not ax.axison
    plt.close("all")
    drawn = book.save_threat_model(tmp_path / "threat_model.png")
    committed = ROOT / "docs" / "threat_model.png"
    assert drawn.read_bytes() == committed.read_bytes(), "redraw it with `make figures`"
    assert "docs/threat_model.png" in (ROOT / "README.md").read_text()
