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


def test_each_chapter_without_ray_is_a_group_of_its_own():
    # A chapter's tests share one execution (a module fixture): its module stays on one worker, while chapters
    # that start no Ray run beside the ray group instead of after it (tests/conftest.py).
    from tests.conftest import xdist_group  # the suite's own set-up, tested here

    assert xdist_group("/ci/clone/tests/chapters/test_chapter1.py") == "chapter1"
    assert xdist_group("tests/chapters/test_chapter5.py") == "chapter5"
    assert {xdist_group(f"/r/tests/chapters/test_chapter{n}.py") for n in (6, 7)} == {"ray"}
    assert xdist_group("/r/tests/test_federated.py") == "ray"
    assert xdist_group("/r/tests/book/test_executed.py") is None
    assert xdist_group("/r/tests/test_rowspace.py") is None
