"""Upkeep of the chapter notebooks: the parts every chapter shares, and the README's figure.

Every chapter notebook opens the same way: a markdown title cell with one
Open-in-Colab badge that points at the notebook itself in the book's
repository, then a first code cell, tagged :data:`INSTALL_TAG`, that in
Colab clones that repository and installs gilib from it. Both are written
from the ``repository`` entry of ``_config.yml``, the one place that names
the repository:

* :func:`check_chapter` reports what is off in a chapter,
* :func:`sync_chapter` rewrites the badge and the install cell,
* :func:`save_threat_model` draws the README's threat-model figure.

This is a maintainer's tool, run from the command line; the chapters never
import it (what they import at run time is :mod:`gilib.book`)::

    python -m gilib.notebooks check          # exit status 1 if a chapter is off
    python -m gilib.notebooks sync           # rewrite badges and install cells
    python -m gilib.notebooks threat-model docs/threat_model.png   # `make figures`
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import nbformat
import yaml

from . import plots
from .data import repo_root

INSTALL_TAG = "colab-install"
"""Tag of each chapter's first code cell, the one that installs gilib in Colab."""

COLAB_BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

_BADGE = re.compile(r"\[!\[Open in Colab\]\([^)]*\)\]\([^)]*\)")
"""An Open-in-Colab badge in markdown, wherever it points."""


def book_config(root: str | Path | None = None) -> dict:
    """The book's ``_config.yml``."""
    return yaml.safe_load((Path(root or repo_root()) / "_config.yml").read_text())


def repository(root: str | Path | None = None) -> tuple[str, str]:
    """``(url, branch)`` of the book's repository, from ``_config.yml``."""
    repo = book_config(root)["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def colab_url(notebook: str, root: str | Path | None = None) -> str:
    """The Colab link of a notebook, given by its path in the repository (``chapters/....ipynb``)."""
    url, branch = repository(root)
    github = "https://github.com/"
    if not url.startswith(github):
        raise ValueError(f"Colab opens notebooks from GitHub; the repository url is {url!r}.")
    return f"https://colab.research.google.com/github/{url[len(github):]}/blob/{branch}/{notebook}"


def badge_markdown(notebook: str, root: str | Path | None = None) -> str:
    """The Open-in-Colab badge line of a chapter."""
    return f"[![Open in Colab]({COLAB_BADGE_IMAGE})]({colab_url(notebook, root)})"


def colab_install_source(root: str | Path | None = None) -> str:
    """The first code cell of every chapter: in Colab, clone the repository and install gilib from it.

    Anywhere else the cell does nothing (``make`` has installed gilib). The
    clone, not a bare ``pip install git+...``, because the chapters read the
    bundled sample and the cached results from the repository.
    """
    url, branch = repository(root)
    clone = "/content/" + url.rsplit("/", 1)[-1]
    return (
        "# In Colab: clone the book's repository and install gilib from it.\n"
        "# Anywhere else this cell does nothing.\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        "    import os\n"
        "    import subprocess\n"
        "\n"
        f'    REPO_URL = "{url}"\n'
        f'    BRANCH = "{branch}"\n'
        f'    CLONE = "{clone}"\n'
        "    if not os.path.isdir(CLONE):\n"
        '        subprocess.run(["git", "clone", "--depth", "1", "--branch", BRANCH,\n'
        "                        REPO_URL, CLONE], check=True)\n"
        '    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",\n'
        '                    "-e", CLONE, "datasets"], check=True)\n'
        "    sys.path.insert(0, CLONE)\n"
        '    os.chdir(os.path.join(CLONE, "chapters"))'
    )


def chapter_notebooks(root: str | Path | None = None) -> list[Path]:
    """Every chapter notebook, in order (``chapters/*.ipynb``)."""
    return sorted((Path(root or repo_root()) / "chapters").glob("*.ipynb"))


def _relative(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def _install_cell_index(nb: nbformat.NotebookNode) -> int | None:
    """Index of the notebook's first code cell (the install cell's place), or ``None``."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            return i
    return None


def check_chapter(path: str | Path, root: str | Path | None = None) -> list[str]:
    """What is missing from a chapter's shared parts; an empty list when nothing is.

    A chapter opens with a markdown title cell holding exactly one
    Open-in-Colab badge that points at this notebook in the repository of
    ``_config.yml``; its first code cell is :func:`colab_install_source`,
    tagged :data:`INSTALL_TAG`; and it has a ``parameters`` cell.
    """
    root = Path(root or repo_root())
    path = Path(path)
    nb = nbformat.read(str(path), as_version=4)
    problems = []
    rel = _relative(path, root)
    title = nb.cells[0].source if nb.cells and nb.cells[0].cell_type == "markdown" else ""
    badge = badge_markdown(rel, root)
    if not title.startswith("# "):
        problems.append(f"{rel}: the first cell is not a markdown title")
    if badge not in title:
        problems.append(f"{rel}: the first cell lacks the Colab badge {badge}")
    badges = sum(c.source.count("colab.research.google.com/github/") for c in nb.cells if c.cell_type == "markdown")
    if badges != 1:
        problems.append(f"{rel}: {badges} Colab links in markdown cells, expected 1")
    first = _install_cell_index(nb)
    if first is None or nb.cells[first].source != colab_install_source(root):
        problems.append(f"{rel}: the first code cell is not the Colab install cell")
    elif INSTALL_TAG not in nb.cells[first].metadata.get("tags", []):
        problems.append(f"{rel}: the Colab install cell lacks the tag {INSTALL_TAG!r}")
    if not any("parameters" in c.metadata.get("tags", []) for c in nb.cells):
        problems.append(f"{rel}: no papermill parameters cell")
    return problems


def sync_chapter(path: str | Path, root: str | Path | None = None) -> bool:
    """Rewrite a chapter's badge and Colab install cell from ``_config.yml``.

    Returns:
        Whether the notebook changed (it is written back only then).
    """
    root = Path(root or repo_root())
    path = Path(path)
    nb = nbformat.read(str(path), as_version=4)
    before = nbformat.writes(nb)
    rel = _relative(path, root)
    badge = badge_markdown(rel, root)
    title = nb.cells[0]
    if _BADGE.search(title.source):
        title.source = _BADGE.sub(lambda _: badge, title.source, count=1)
    else:
        head, _, rest = title.source.partition("\n")
        title.source = f"{head}\n\n{badge}\n{rest}".rstrip("\n")
    first = _install_cell_index(nb)
    source = colab_install_source(root)
    if first is not None and INSTALL_TAG in nb.cells[first].metadata.get("tags", []):
        nb.cells[first].source = source
    else:
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = [INSTALL_TAG]
        nb.cells.insert(1, cell)
    after = nbformat.writes(nb)
    if after == before:
        return False
    nbformat.write(nb, str(path))
    return True


def save_threat_model(path: str | Path) -> Path:
    """Draw :func:`gilib.plots.threat_model` into an image file (the README's figure)."""
    matplotlib.use("Agg")  # a file, never a window: the same bytes with or without a display
    plots.set_style()
    ax = plots.threat_model()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp in the file, so that redrawing an unchanged figure changes no byte.
    ax.figure.savefig(path, metadata={"Software": None})
    plt.close(ax.figure)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m gilib.notebooks check | sync | threat-model PATH``."""
    parser = argparse.ArgumentParser(prog="python -m gilib.notebooks", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="report chapters whose Colab badge or install cell is off")
    sub.add_parser("sync", help="rewrite every chapter's Colab badge and install cell from _config.yml")
    figure = sub.add_parser("threat-model", help="draw the threat-model figure into a file")
    figure.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "threat-model":
        print(save_threat_model(args.path))
        return 0
    if args.command == "sync":
        for path in chapter_notebooks():
            if sync_chapter(path):
                print(f"updated {path.name}")
        return 0
    problems = [p for path in chapter_notebooks() for p in check_chapter(path)]
    print("\n".join(problems) or "every chapter has its Colab badge and install cell")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
