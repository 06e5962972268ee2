"""The README's tables are what the commands it names print.

Every table the README quotes is introduced by the command that prints it
(```python -m gilib.studies STUDY TABLE ...```). Each such command is run
here, in this process, and its output must stand in the README verbatim:
after new results, rerun the command and paste its table.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gilib.studies import all_studies
from gilib.studies.study import main

README = Path(__file__).resolve().parents[2] / "README.md"
COMMAND = re.compile(r"`python -m gilib\.studies ([^`]+)`")


def _table_commands() -> list[str]:
    """The README's table commands: a study and one of its tables, on the cached files (no placeholder)."""
    found = []
    for args in COMMAND.findall(README.read_text()):
        words = shlex.split(args)
        if len(words) >= 2 and words[1] != "run" and not any(w.isupper() for w in words):
            found.append(args)
    return found


def test_the_readme_names_a_command_for_each_of_its_tables():
    commands = _table_commands()
    studies = {shlex.split(c)[0] for c in commands}
    assert studies == {"grids", "span", "federated", "headlines"}, commands
    assert len(commands) >= 8


@pytest.mark.parametrize("args", _table_commands())
def test_the_readme_quotes_what_each_table_command_prints(args, capsys):
    assert main(all_studies(), shlex.split(args)) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("| ") and printed in README.read_text(), \
        f"update the README's table under: python -m gilib.studies {args}"
