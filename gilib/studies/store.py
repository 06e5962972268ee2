"""The results store: one JSON line per measurement, appended safely, read back strictly.

Every study writes its lines into a file of ``data/results/`` (or any path
the caller names) through :func:`append_lines` and reads them back with
:func:`read_lines`:

* **safe appends**: a last line cut short by a killed run is removed before
  anything is appended (:func:`repair`), so it never fuses with the next
  record; each call is one write and an ``fsync``;
* **strict reads**: a cut last line is skipped (the next append removes it),
  anything else that is not a JSON object on its own line, or a file that is
  not UTF-8 text at all, is an error that names the file and the line;
* **provenance**: the runner stamps every line it writes with
  :func:`gilib.data.git_commit`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import pandas as pd


def read_lines(path: str | Path) -> list[dict]:
    """The records of a results file (none if it does not exist).

    A last line cut short by a killed run is skipped; a malformed line
    anywhere else means the file was damaged, and is an error.

    Raises:
        ValueError: for a file that is not UTF-8 text (a binary file, a
            results file of another kind), or a line that is not a JSON
            object and is not the last one.
    """
    path = Path(path)
    if not path.exists():
        return []
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass a results file (JSON lines, e.g. data/results/ch2_layers.jsonl).")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not a results file: byte {err.start} is not UTF-8 text (a binary or damaged file?). "
            f"Pass a file of JSON lines such as data/results/ch2_layers.jsonl, or delete it to recompute it."
        ) from None
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                continue  # the last line of a run killed mid-write; the next append removes it
            row = None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}, is not JSON (one object per line): the file was edited or "
                             f"damaged. Remove that line and rerun to recompute it.")
        rows.append(row)
    return rows


def repair(path: str | Path) -> None:
    """Cut a results file back to its last complete line (a killed run may leave half a line)."""
    path = Path(path)
    if not path.exists() or not path.stat().st_size:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with path.open("r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)


def append_lines(path: str | Path, lines: Iterable[dict]) -> None:
    """Append records to a results file, one JSON line each, after :func:`repair`.

    One write and an ``fsync`` per call: a kill loses at most this call's
    lines, and never damages an earlier one.
    """
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if not text:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair(path)
    with path.open("a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def study_frame(path: str | Path, study: str, command: str) -> pd.DataFrame:
    """The lines of one part of a results file (field ``study``), as a table.

    Args:
        path: the results file.
        study: the value of the lines' ``study`` field.
        command: the command that writes them, for the error message.

    Raises:
        ValueError: if the file holds no such line.
    """
    rows = [r for r in read_lines(path) if r.get("study") == study]
    if not rows:
        raise ValueError(f"{path} has no '{study}' lines: run {command}")
    return pd.DataFrame(rows)
