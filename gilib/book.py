"""Helpers a chapter notebook needs around the science.

Fast mode and recorded values, the online or offline setting of a chapter
(:func:`choose_setup`), and the parts every chapter shares: the Open-in-Colab
badge and the first code cell that installs gilib in Colab
(:func:`check_chapter`, :func:`sync_chapter`; ``python -m gilib.book check``).

Every chapter has a papermill ``parameters`` cell. Its settings default to
``None`` and :func:`pick` resolves them after papermill has injected its own
values, so that ``papermill -p FAST_MODE False`` changes every setting that
was left at ``None``.

A chapter *records* the numbers it reports with :func:`record`. In the book
build they are glued into the page (``{glue:text}`` in markdown, through
myst-nb); the tests read them back from the executed notebook with
:func:`read_records` and check them.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nbformat
import yaml

FAST_MODE_ENV = "GILIB_FAST_MODE"
ONLINE_ENV = "GILIB_ONLINE"
"""Set to 1 to let a chapter go online outside Colab (when the hub is reachable)."""

OFFLINE_MODEL = "minilm"
ONLINE_MODEL = "bert-base-uncased"
OFFLINE_DATASET = "sample"
ONLINE_DATASET = "cola"

INSTALL_TAG = "colab-install"
"""Tag of each chapter's first code cell, the one that installs gilib in Colab."""

COLAB_BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_RECORD_MIME = "application/papermill.record/text/plain"

T = TypeVar("T")


def fast_mode() -> bool:
    """Whether chapters run their cheap settings.

    ``$GILIB_FAST_MODE`` decides: anything but ``0`` (or unset) is fast mode,
    which is what the book build and the tests run.
    """
    return os.environ.get(FAST_MODE_ENV, "1").strip().lower() not in ("0", "false", "no")


def pick(value: T | None, fast: T, full: T, fast_mode: bool) -> T:
    """A chapter setting: ``value`` when given, else the fast or the full default."""
    if value is not None:
        return value
    return fast if fast_mode else full


def record(name: str, value: Any) -> None:
    """Record a value the chapter reports, for the page and for the tests.

    Args:
        name: a unique name within the chapter.
        value: a number, string, or a list / dict of them (stored by ``repr``).
    """
    try:
        from myst_nb import glue
    except ImportError:  # e.g. in Colab: nothing reads the records there
        return
    glue(name, _plain(value), display=False)


def _plain(value: Any) -> Any:
    """Python scalars in place of numpy / torch ones, so that ``repr`` round-trips."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def read_records(notebook: str | Path | nbformat.NotebookNode) -> dict[str, Any]:
    """The values an executed notebook recorded with :func:`record`.

    Args:
        notebook: path of an executed ``.ipynb``, or the notebook itself.

    Returns:
        ``{name: value}``, values parsed back from their ``repr``.
    """
    nb = notebook if isinstance(notebook, nbformat.NotebookNode) else nbformat.read(str(notebook), as_version=4)
    records: dict[str, Any] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            text = output["data"][_RECORD_MIME]
            try:
                records[name] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                records[name] = text
    return records


# --------------------------------------------------------------------------- #
# Online or offline: which victim and which data a chapter uses.
# --------------------------------------------------------------------------- #


def in_colab() -> bool:
    """Whether this kernel runs in Google Colab."""
    return "google.colab" in sys.modules


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (and is not disabled)."""
    from .models import hub_available

    return hub_available(timeout=timeout)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Setup:
    """What a chapter runs on.

    Attributes:
        online: whether the chapter uses the hub (model and datasets).
        model: a name for :func:`gilib.models.load_model`.
        dataset: a dataset for :func:`load_sentences`.
        device: ``"cuda"`` or ``"cpu"``.
        reason: one sentence saying why, for the reader.
    """

    online: bool
    model: str
    dataset: str
    device: str
    reason: str

    def __str__(self) -> str:
        branch = "online" if self.online else "offline"
        return f"{branch}: model {self.model!r}, data {self.dataset!r}, device {self.device} ({self.reason})"


def choose_setup(
    online: bool | None = None,
    model: str | None = None,
    dataset: str | None = None,
    device: str | None = None,
    *,
    offline_dataset: str = OFFLINE_DATASET,
    online_dataset: str = ONLINE_DATASET,
    reachable: Callable[[], bool] = hub_reachable,
) -> Setup:
    """Pick the online branch (bert-base-uncased, hub datasets) or the offline default.

    Args:
        online: ``None`` (the chapters' default) goes online only in Colab,
            or where ``$GILIB_ONLINE`` is 1; ``True`` asks for the hub
            anywhere; ``False`` stays offline. The online branch is taken
            only when the hub is reachable; otherwise the chapter falls back
            to the offline default and says so.
        model: a victim name that wins over both defaults
            (``"minilm"`` offline, ``"bert-base-uncased"`` online).
        dataset: a dataset that wins over both defaults
            (``offline_dataset`` / ``online_dataset``).
        device: wins over the default, ``"cuda"`` when a GPU is visible.
        offline_dataset: the chapter's offline data (the bundled sample).
        online_dataset: the chapter's online data (a hub dataset).
        reachable: the hub check, called only when the online branch is wanted.

    Returns:
        The :class:`Setup`.
    """
    wanted = online if online is not None else (in_colab() or _truthy(os.environ.get(ONLINE_ENV)))
    if not wanted:
        go_online = False
        reason = ("the offline default; set ONLINE = True for bert-base-uncased and the hub datasets"
                  if online is None else "ONLINE = False")
    elif reachable():
        go_online, reason = True, "the Hugging Face hub is reachable"
    else:
        go_online, reason = False, "the Hugging Face hub is not reachable, so the offline default"
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Setup(
        online=go_online,
        model=model or (ONLINE_MODEL if go_online else OFFLINE_MODEL),
        dataset=dataset or (online_dataset if go_online else offline_dataset),
        device=device,
        reason=reason,
    )


def load_sentences(setup: Setup, split: str = "train") -> list:
    """The sentences of ``setup.dataset``: from the hub online, from local files offline.

    The bundled sample is always read from the repository. Offline, the
    benchmark datasets need their local files (``$GILIB_DATA_DIR``).
    """
    from .data import load_hub_split, load_split

    if setup.online and setup.dataset != "sample":
        return load_hub_split(setup.dataset, split)
    return load_split(setup.dataset, split)


# --------------------------------------------------------------------------- #
# What every chapter shares: the Colab badge and the Colab install cell.
# --------------------------------------------------------------------------- #


def book_config(root: str | Path | None = None) -> dict:
    """The book's ``_config.yml``."""
    from .data import repo_root

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
    from .data import repo_root

    return sorted((Path(root or repo_root()) / "chapters").glob("*.ipynb"))


def _relative(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def _install_cell_index(nb: nbformat.NotebookNode) -> int | None:
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
    from .data import repo_root

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
    import re

    from .data import repo_root

    root = Path(root or repo_root())
    path = Path(path)
    nb = nbformat.read(str(path), as_version=4)
    before = nbformat.writes(nb)
    rel = _relative(path, root)
    badge = badge_markdown(rel, root)
    pattern = re.compile(r"\[!\[Open in Colab\]\([^)]*\)\]\([^)]*\)")
    title = nb.cells[0]
    if pattern.search(title.source):
        title.source = pattern.sub(lambda _: badge, title.source, count=1)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import plots

    plots.set_style()
    ax = plots.threat_model()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp in the file, so that redrawing an unchanged figure changes no byte.
    ax.figure.savefig(path, metadata={"Software": None})
    plt.close(ax.figure)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m gilib.book check | sync | threat-model PATH``."""
    parser = argparse.ArgumentParser(prog="python -m gilib.book", description=main.__doc__)
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
