"""What a chapter notebook imports at run time, around the science.

A chapter imports ``from gilib.book import choose_setup, fast_mode,
load_sentences, pick, record`` (and ``record_all``):

* :func:`fast_mode` and :func:`pick`: every chapter has a papermill
  ``parameters`` cell whose settings default to ``None``; :func:`pick`
  resolves them after papermill has injected its own values, so that
  ``papermill -p FAST_MODE False`` changes every setting left at ``None``.
* :func:`choose_setup` and :func:`load_sentences`: the online branch
  (bert-base-uncased and the hub datasets) or the offline default (the
  bundled model and sample), as a :class:`Setup` the chapter prints.
* :func:`record` and :func:`record_all`: a chapter records the numbers it
  reports (a study's summary returns the facts its table shows). In the book
  build they are glued into the page (``{glue:text}`` in markdown, through
  myst-nb); the tests read them back from the executed notebook with
  :func:`read_records` and check them.

The upkeep of the notebooks themselves (Colab badge, install cell, the
README's figure) is :mod:`gilib.book.upkeep`, which the chapters never import.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nbformat

from .. import data

FAST_MODE_ENV = "GILIB_FAST_MODE"
ONLINE_ENV = "GILIB_ONLINE"
"""Set to 1 to let a chapter go online outside Colab (when the hub is reachable)."""

OFFLINE_MODEL = "minilm"
ONLINE_MODEL = "bert-base-uncased"
OFFLINE_DATASET = "sample"
ONLINE_DATASET = "cola"

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


def record_all(facts: dict[str, Any]) -> None:
    """:func:`record` every entry of ``facts``, e.g. the facts a study's summary returns with its table."""
    for name, value in facts.items():
        record(name, value)


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

    papermill keeps every record in the notebook's outputs; jupyter-book
    moves them out, into a ``<name>.glue.json`` beside the executed copy it
    writes to ``_build/jupyter_execute/``. Both are read.

    Args:
        notebook: path of an executed ``.ipynb``, or the notebook itself.

    Returns:
        ``{name: value}``, values parsed back from their ``repr``.
    """
    nb = notebook if isinstance(notebook, nbformat.NotebookNode) else nbformat.read(str(notebook), as_version=4)
    outputs = [output for cell in nb.cells for output in cell.get("outputs", [])]
    if not isinstance(notebook, nbformat.NotebookNode):
        glued = Path(notebook).with_suffix(".glue.json")
        if glued.is_file():
            outputs += list(json.loads(glued.read_text()).values())
    records: dict[str, Any] = {}
    for output in outputs:
        name = output.get("metadata", {}).get("scrapbook", {}).get("name")
        if name is None:
            continue
        data = output["data"]
        text = data.get(_RECORD_MIME, data.get("text/plain"))
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
    # Imported here, not at the top: gilib.models loads torch and transformers,
    # which readers of the records (tests/chapters) do not need.
    from ..models import hub_available

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
        import torch  # here, not at the top, for the same reason as in hub_reachable

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
    if setup.online and setup.dataset != "sample":
        return data.load_hub_split(setup.dataset, split)
    return data.load_split(setup.dataset, split)
