"""The test suite's own set-up (tests/conftest.py): what ``make test`` relies on."""

import re
import subprocess
import sys

from gilib.data import repo_root

REPO = repo_root()


def test_the_ray_group_runs_on_one_worker():
    # make test runs `pytest -n auto --dist loadgroup`; the tests that start Ray or execute chapters must stay on
    # one worker, one after another (and a module's round fixture then runs once). Quick tests of those files
    # (no round) on two workers.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider",
         "tests/test_federated.py", "-k", "bad_rounds or client_batches or secagg_settings"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workers = re.findall(r"\[(gw\d+)\] .*PASSED tests/test_federated.py::.*@ray", done.stdout)
    assert len(workers) >= 10 and len(set(workers)) == 1, done.stdout[-3000:]
