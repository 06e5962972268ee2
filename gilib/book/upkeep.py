"""Upkeep of the chapter notebooks: the parts every chapter shares, the links, the README's figure.

Every chapter notebook opens the same way: a markdown title cell with one
Open-in-Colab badge that points at the notebook itself in the book's
repository, then a first code cell, tagged :data:`INSTALL_TAG` (and
:data:`HIDE_TAG`, which keeps it out of the HTML book), that in Colab
clones that repository and installs gilib from it. Both are written
from the ``repository`` entry of ``_config.yml``, the one place that names
the repository. The files of :data:`REPOSITORY_FILES` (``README.md``,
``CITATION.cff``) name it too, and are kept in step with it:

* :func:`check_chapter` reports what is off in a chapter,
* :func:`sync_chapter` rewrites the badge and the install cell,
* :func:`check_repository_links` reports links of README.md or CITATION.cff
  that are not the repository of ``_config.yml``,
* :func:`sync_repository_links` rewrites them,
* :func:`save_threat_model` draws the README's threat-model figure.

How the repository is found in README.md and CITATION.cff: by pattern, with
no marker in the text. Every link of these two files to GitHub is a link to
the book's repository (tests/book/test_upkeep.py checks that README.md names
no other), so every ``https://github.com/<owner>/<name>``, every Colab link
``https://colab.research.google.com/github/<owner>/<name>/blob/<branch>/<path>``
and every GitHub Pages address ``https://<owner>.github.io/<name>`` is
rewritten to the owner and name of ``_config.yml`` (a Colab link to its
branch as well), whatever it named before; what follows the name
(``/blob/...``, a ``.git`` suffix, the path of a page) is kept. The old
address need not be known, so a file that drifted from the others on its
own is caught and repaired as well. A link to another project on GitHub
belongs in the chapters (whose prose is left alone), not in these two files.

This is a maintainer's tool, run from the command line; the chapters never
import it (what they import at run time is :mod:`gilib.book`)::

    python -m gilib.book.upkeep check   # exit status 1 if a chapter, README.md or CITATION.cff is off
    python -m gilib.book.upkeep sync    # rewrite badges, install cells and the links of both files
    python -m gilib.book.upkeep threat-model docs/threat_model.png   # `make figures`

After changing ``repository: url:`` (or ``branch:``) in ``_config.yml``,
``sync`` carries the change everywhere and ``check`` confirms it.
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
from ..data import repo_root

INSTALL_TAG = "colab-install"
"""Tag of each chapter's first code cell, the one that installs gilib in Colab."""

HIDE_TAG = "remove-cell"
"""Tag that keeps a cell in the notebook (and in Colab) but out of the HTML book:
the install cell carries it, since a reader of the page has nothing to install."""

COLAB_BADGE_IMAGE = "images/colab-badge.svg"
"""The badge image, shipped with the book (``chapters/images/``), so that an
offline build and a reader without access to Colab's site see it."""

_BADGE = re.compile(r"\[!\[Open in Colab\]\([^)]*\)\]\([^)]*\)")
"""An Open-in-Colab badge in markdown, wherever it points."""

REPOSITORY_FILES = ("README.md", "CITATION.cff")
"""Files besides the chapters that name the book's repository (paths from the repository root)."""

GITHUB = "https://github.com/"

# The three kinds of link to the repository (see the module docstring). A
# name may hold dots, so the name group takes them all and _split_name gives
# back a ".git" suffix or a sentence's full stop.
_GITHUB_LINK = re.compile(r"https://github\.com/(?P<owner>[\w-]+)/(?P<name>[\w.-]+)")
_COLAB_LINK = re.compile(
    r"https://colab\.research\.google\.com/github/(?P<owner>[\w-]+)/(?P<name>[\w.-]+)"
    r"/blob/(?P<branch>[\w.-]+)/(?P<path>[\w./-]+)"
)
_PAGES_LINK = re.compile(r"https://(?P<owner>[\w-]+)\.github\.io/(?P<name>[\w.-]+)")


def _book_config(root: str | Path | None = None) -> dict:
    """The book's ``_config.yml``."""
    return yaml.safe_load((Path(root or repo_root()) / "_config.yml").read_text())


def repository(root: str | Path | None = None) -> tuple[str, str]:
    """``(url, branch)`` of the book's repository, from ``_config.yml``."""
    repo = _book_config(root)["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def _github_repository(root: str | Path | None = None) -> tuple[str, str]:
    """``(owner, name)`` of the book's repository on GitHub, from ``_config.yml``.

    Raises:
        ValueError: if the repository of ``_config.yml`` is not on GitHub.
    """
    url, _ = repository(root)
    owner, _, name = url.removeprefix(GITHUB).partition("/")
    if not url.startswith(GITHUB) or not owner or not name or "/" in name:
        raise ValueError(f"expected the repository url as {GITHUB}<owner>/<name>; it is {url!r}.")
    return owner, name


def colab_url(notebook: str, root: str | Path | None = None) -> str:
    """The Colab link of a notebook, given by its path in the repository (``chapters/....ipynb``)."""
    url, branch = repository(root)
    if not url.startswith(GITHUB):
        raise ValueError(f"Colab opens notebooks from GitHub; the repository url is {url!r}.")
    return f"https://colab.research.google.com/github/{url[len(GITHUB):]}/blob/{branch}/{notebook}"


def pages_url(root: str | Path | None = None) -> str:
    """Where GitHub Pages serves the book: ``https://<owner>.github.io/<name>/``.

    GitHub lowercases the owner in the host name. A custom domain set in the
    repository's Pages settings is not known here.
    """
    owner, name = _github_repository(root)
    return f"https://{owner.lower()}.github.io/{name}/"


def _badge_markdown(notebook: str, root: str | Path | None = None) -> str:
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


def chapter_path(chapter: str | Path, root: str | Path | None = None) -> Path:
    """A chapter's notebook from its name (``"05_span_check"``, with or without ``.ipynb``) or path.

    Raises:
        ValueError: for a chapter that is not there, naming the chapters.
    """
    root = Path(root or repo_root())
    path = Path(chapter)
    if path.suffix != ".ipynb":
        path = path.with_suffix(".ipynb")
    if not path.is_absolute():
        path = root / "chapters" / path.name
    if not path.is_file():
        names = ", ".join(p.stem for p in chapter_notebooks(root))
        raise ValueError(f"Unknown chapter {str(chapter)!r}; the chapters are: {names}.")
    return path


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
    tagged :data:`INSTALL_TAG` and :data:`HIDE_TAG`; and it has a ``parameters`` cell.
    """
    root = Path(root or repo_root())
    path = Path(path)
    nb = nbformat.read(str(path), as_version=4)
    problems = []
    rel = _relative(path, root)
    title = nb.cells[0].source if nb.cells and nb.cells[0].cell_type == "markdown" else ""
    badge = _badge_markdown(rel, root)
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
    else:
        for tag in (INSTALL_TAG, HIDE_TAG):
            if tag not in nb.cells[first].metadata.get("tags", []):
                problems.append(f"{rel}: the Colab install cell lacks the tag {tag!r}")
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
    badge = _badge_markdown(rel, root)
    title = nb.cells[0]
    if _BADGE.search(title.source):
        title.source = _BADGE.sub(lambda _: badge, title.source, count=1)
    else:
        head, _, rest = title.source.partition("\n")
        title.source = f"{head}\n\n{badge}\n{rest}".rstrip("\n")
    first = _install_cell_index(nb)
    source = colab_install_source(root)
    if first is not None and INSTALL_TAG in nb.cells[first].metadata.get("tags", []):
        cell = nb.cells[first]
        cell.source = source
    else:
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = [INSTALL_TAG]
        nb.cells.insert(1, cell)
    if HIDE_TAG not in cell.metadata["tags"]:
        cell.metadata["tags"].append(HIDE_TAG)
    after = nbformat.writes(nb)
    if after == before:
        return False
    nbformat.write(nb, str(path))
    return True


def _split_name(name: str) -> tuple[str, str]:
    """A matched repository name and what the pattern took after it: a ``.git`` suffix, a full stop."""
    tail = ""
    while name.endswith("."):  # a name never ends in a dot: the sentence does
        name, tail = name[:-1], "." + tail
    if name.endswith(".git"):
        name, tail = name[: -len(".git")], ".git" + tail
    return name, tail


def _repository_links(text: str, root: Path) -> list[tuple[re.Match, str]]:
    """Every link of ``text`` to a repository on GitHub, with what it should read.

    Returns:
        ``(match, expected)`` pairs, in the order of the text; ``expected``
        is the link rewritten to the repository of ``_config.yml``.
    """
    owner, name = _github_repository(root)
    links = []
    for match in _GITHUB_LINK.finditer(text):
        tail = _split_name(match["name"])[1]
        links.append((match, f"{GITHUB}{owner}/{name}{tail}"))
    for match in _COLAB_LINK.finditer(text):
        path = match["path"].rstrip(".")  # not a full stop that ends the sentence
        links.append((match, colab_url(path, root) + match["path"][len(path):]))
    for match in _PAGES_LINK.finditer(text):
        tail = _split_name(match["name"])[1]
        links.append((match, f"https://{owner.lower()}.github.io/{name}{tail}"))
    return sorted(links, key=lambda link: link[0].start())


def repository_files(root: str | Path | None = None) -> list[Path]:
    """The files of :data:`REPOSITORY_FILES` that the repository holds."""
    root = Path(root or repo_root())
    return [root / name for name in REPOSITORY_FILES if (root / name).is_file()]


def check_repository_links(path: str | Path, root: str | Path | None = None) -> list[str]:
    """What is off in the links of README.md or CITATION.cff; an empty list when nothing is.

    Every link to GitHub (see the module docstring) must be the repository of
    ``_config.yml``, and the file must name it at least once; a
    ``CITATION.cff`` must give it as its ``repository-code``.
    """
    root = Path(root or repo_root())
    path = Path(path)
    rel = _relative(path, root)
    text = path.read_text()
    links = _repository_links(text, root)
    problems = []
    for match, expected in links:
        if match[0] != expected:
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{rel}:{line}: {match[0]} is not the repository of _config.yml ({expected})")
    if not links:
        problems.append(f"{rel}: names the repository nowhere")
    if path.suffix == ".cff":
        url, _ = repository(root)
        code = (yaml.safe_load(text) or {}).get("repository-code")
        if code != url:
            problems.append(f"{rel}: repository-code is {code!r}, not {url!r}")
    return problems


def sync_repository_links(path: str | Path, root: str | Path | None = None) -> bool:
    """Rewrite the links of README.md or CITATION.cff to the repository of ``_config.yml``.

    Only the links change: the rest of the text, comments and layout
    included, is written back byte for byte.

    Returns:
        Whether the file changed (it is written back only then).
    """
    root = Path(root or repo_root())
    path = Path(path)
    text = path.read_text()
    parts, end = [], 0
    for match, expected in _repository_links(text, root):
        parts += [text[end:match.start()], expected]
        end = match.end()
    after = "".join(parts) + text[end:]
    if after == text:
        return False
    path.write_text(after)
    return True


def check(root: str | Path | None = None) -> list[str]:
    """What :func:`check_chapter` and :func:`check_repository_links` report, for every file."""
    return ([p for path in chapter_notebooks(root) for p in check_chapter(path, root)]
            + [p for path in repository_files(root) for p in check_repository_links(path, root)])


def sync(root: str | Path | None = None) -> list[Path]:
    """Rewrite every chapter and every file of :data:`REPOSITORY_FILES` from ``_config.yml``.

    Returns:
        The files that changed.
    """
    chapters = [path for path in chapter_notebooks(root) if sync_chapter(path, root)]
    return chapters + [path for path in repository_files(root) if sync_repository_links(path, root)]


def save_threat_model(path: str | Path) -> Path:
    """Draw :func:`gilib.book.plots.threat_model` into an image file (the README's figure)."""
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
    """``python -m gilib.book.upkeep check | sync | threat-model PATH``."""
    parser = argparse.ArgumentParser(prog="python -m gilib.book.upkeep", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("check", "report chapters whose Colab badge or install cell is off, and links of README.md "
                  "or CITATION.cff to another repository than _config.yml's"),
        ("sync", "rewrite every chapter's Colab badge and install cell, and the links of README.md "
                 "and CITATION.cff, from _config.yml"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("--root", type=Path, default=None,
                             help="the book's root folder (default: the one that holds gilib)")
    figure = sub.add_parser("threat-model", help="draw the threat-model figure into a file")
    figure.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "threat-model":
        print(save_threat_model(args.path))
        return 0
    if args.command == "sync":
        for path in sync(args.root):
            print(f"updated {_relative(path, Path(args.root or repo_root()))}")
        return 0
    problems = check(args.root)
    print("\n".join(problems) or ("every chapter has its Colab badge and install cell; "
                                  + " and ".join(REPOSITORY_FILES) + " name the repository of _config.yml"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
