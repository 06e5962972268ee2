"""gilib.book: what a chapter imports at run time (fast mode, records, the online or offline setup).

Also the book's own files: its configuration, bibliography and table of contents.
"""

import json
import socket
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

import gilib.data
from gilib.book import chapter
from gilib.book import Setup, choose_setup, fast_mode, load_sentences, pick, read_records

ROOT = Path(__file__).resolve().parents[2]


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


def test_records_that_jupyter_book_moved_beside_the_notebook_are_read(tmp_path):
    # jupyter-book writes the executed chapter without its glue outputs and keeps them in <name>.glue.json.
    path = tmp_path / "05_span_check.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), str(path))
    glued = {name: {"output_type": "display_data", "data": {"text/plain": text},
                    "metadata": {"scrapbook": {"name": name, "mime_prefix": "application/papermill.record/"}}}
             for name, text in (("live_exact", "3"), ("best_other", "\"layer 0's attention.key\""))}
    path.with_suffix(".glue.json").write_text(json.dumps(glued))
    assert read_records(path) == {"live_exact": 3, "best_other": "layer 0's attention.key"}


# --------------------------------------------------------------------------- #
# Online or offline: the chapters' setup.
# --------------------------------------------------------------------------- #

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


def test_the_real_hub_check_respects_offline_mode_and_the_network(monkeypatch):
    connections = []

    class Answered:  # a connection that opened
        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    def answering(address, timeout):
        connections.append((address, timeout))
        return Answered()

    def refusing(address, timeout):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", answering)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert chapter.hub_reachable() is False and connections == []  # offline mode: no connection even tried
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert chapter.hub_reachable(timeout=1.0) is True and connections == [(("huggingface.co", 443), 1.0)]
    monkeypatch.setattr(socket, "create_connection", refusing)
    assert chapter.hub_reachable(timeout=1.0) is False


def test_load_sentences_offline_reads_local_files():
    setup = Setup(online=False, model="minilm", dataset="sample", device="cpu", reason="")
    sentences = load_sentences(setup)
    assert len(sentences) > 10 and sentences[0].dataset == "sample"
    # The bundled sample is local even online; the benchmarks come from the hub.
    assert load_sentences(Setup(True, "bert-base-uncased", "sample", "cpu", "")) == sentences


def test_load_sentences_online_reads_the_hub(monkeypatch):
    calls = []
    monkeypatch.setattr(gilib.data, "load_hub_split", lambda d, s="train": calls.append((d, s)) or ["row"])
    assert load_sentences(Setup(True, "bert-base-uncased", "cola", "cpu", "")) == ["row"]
    assert calls == [("cola", "train")]


def test_the_chapters_module_stays_light_and_never_imports_the_upkeep_tools():
    code = ("import sys, gilib.book; "
            "print(sorted(m for m in ('gilib.book.upkeep', 'gilib.book.plots', 'torch') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


# --------------------------------------------------------------------------- #
# The book's configuration and pages.
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


def test_toc_orders_intro_primer_chapters_conclusion_references_and_run_times():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for c in toc["chapters"]]
    assert toc["root"] == "chapters/intro"
    # The way in comes before the first chapter; the paper comparison and
    # the course page after the last one.
    assert files[0] == "chapters/primer" and files[1] == "chapters/01_full_model_inversion"
    assert files.index("chapters/06_federated_rounds") < files.index("chapters/paper")
    assert "chapters/course" in files
    assert files.index("chapters/04_dp_defence") < files.index("chapters/conclusion") < files.index("chapters/references")
    assert "chapters/runtimes" in files
    assert "{nb-exec-table}" in (ROOT / "chapters" / "runtimes.md").read_text()
    for page in ("intro", "conclusion"):  # executed pages: their numbers and figure come from code
        assert "{code-cell}" in (ROOT / "chapters" / f"{page}.md").read_text()
