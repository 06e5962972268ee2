"""The GitHub Actions workflow that tests, builds and publishes the book (.github/workflows/book.yml).

Two checks, both offline. The schema check runs check-jsonschema against
the GitHub workflow schema it ships (``--builtin-schema
vendor.github-workflows``: no download), and shows on broken copies that it
can fail. The behaviour check reads the workflow as data and asserts what it
must do: run the README's test command, build with its book command, upload
``_build/html`` and deploy it to Pages after both.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"


def check_jsonschema(path: Path, schema: str = "vendor.github-workflows") -> subprocess.CompletedProcess:
    """Run check-jsonschema with one of its built-in schemas on a file; the process, finished."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
        capture_output=True, text=True, timeout=120,
    )


def readme_command(target: str) -> str:
    """The README's command that starts with ``make <target>``, from the bash block under "The two commands"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    [command] = [line for line in lines if line.split()[:2] == ["make", target]]
    return command


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def commands(job: dict) -> list[str]:
    """Every shell line the job runs, comments and blank lines left out."""
    lines = (line.strip() for step in steps(job) for line in step.get("run", "").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def uses(job: dict, action: str) -> list[dict]:
    """The steps of a job that use ``action`` (``owner/name``, any version)."""
    return [step for step in steps(job) if step.get("uses", "").split("@")[0] == action]


def needs(job: dict) -> list[str]:
    value = job.get("needs", [])
    return [value] if isinstance(value, str) else list(value)


def the_job(workflow: dict, what: str, test) -> str:
    """The name of the one job for which ``test(job)`` holds."""
    names = [name for name, job in workflow["jobs"].items() if test(job)]
    assert len(names) == 1, f"expected one job that {what}, found {names}"
    return names[0]


def test_the_workflow_passes_the_github_workflow_schema():
    done = check_jsonschema(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok -- validation done" in done.stdout
    # check-jsonschema's stricter schema: every job has timeout-minutes.
    done = check_jsonschema(WORKFLOW, "custom.github-workflows-require-timeout")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "break_it, error",
    [
        # A misspelt top-level key: "job" is not a key, and "jobs" is missing.
        (lambda text: re.sub(r"^jobs:", "job:", text, flags=re.M), "'job' was unexpected"),
        # A job with nowhere to run.
        (lambda text: text.replace("    runs-on: ubuntu-latest\n", "", 1), "runs-on"),
    ],
    ids=["misspelt-jobs", "no-runs-on"],
)
def test_the_schema_check_rejects_a_broken_workflow(tmp_path, break_it, error):
    text = WORKFLOW.read_text()
    broken = tmp_path / "book.yml"
    broken.write_text(break_it(text))
    assert broken.read_text() != text
    done = check_jsonschema(broken)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Schema validation errors" in done.stdout and error in done.stdout, done.stdout


def test_the_timeout_schema_rejects_a_job_without_a_timeout(tmp_path):
    broken = tmp_path / "book.yml"
    broken.write_text(WORKFLOW.read_text().replace("    timeout-minutes: 60\n", "", 1))
    done = check_jsonschema(broken, "custom.github-workflows-require-timeout")
    assert done.returncode == 1 and "timeout-minutes" in done.stdout, done.stdout + done.stderr


def test_the_readme_names_the_commands_the_workflow_runs():
    assert readme_command("test") == "make test"
    assert readme_command("book") == "make book"


def test_triggers_and_top_level_permissions(workflow):
    on = workflow.get("on", workflow.get(True))  # PyYAML reads the key `on` as True
    assert on["push"]["branches"] == ["main"]
    assert "pull_request" in on and "workflow_dispatch" in on
    assert workflow["permissions"] == {"contents": "read"}


def test_a_job_runs_the_readmes_test_command_on_python_3_11(workflow):
    command = readme_command("test")
    name = the_job(workflow, f"runs {command!r}", lambda job: command in commands(job))
    job = workflow["jobs"][name]
    assert job["runs-on"] == "ubuntu-latest"
    assert job["timeout-minutes"] == 60
    [python] = uses(job, "actions/setup-python")
    assert python["uses"] == "actions/setup-python@v5"
    # A string: unquoted, YAML would read 3.10 as 3.1.
    assert python["with"]["python-version"] == "3.11"
    assert python["with"]["cache"] == "pip"
    assert python["with"]["cache-dependency-path"].split() == ["requirements.txt", "constraints.txt"]
    assert uses(job, "actions/checkout")


def test_a_job_builds_the_book_after_the_tests_and_uploads_the_html(workflow):
    test = the_job(workflow, "runs the tests", lambda job: readme_command("test") in commands(job))
    command = readme_command("book")
    name = the_job(workflow, f"runs {command!r}", lambda job: command in commands(job))
    job = workflow["jobs"][name]
    assert needs(job) == [test]
    assert job["timeout-minutes"] == 60
    [python] = uses(job, "actions/setup-python")
    assert python["with"]["python-version"] == "3.11" and python["with"]["cache"] == "pip"
    [upload] = uses(job, "actions/upload-pages-artifact")
    assert upload["uses"] == "actions/upload-pages-artifact@v3"
    assert upload["with"]["path"] == "_build/html"
    # Where the README says `make book` writes the HTML.
    assert "_build/html" in (ROOT / "README.md").read_text().split("make book", 1)[1].splitlines()[0]
    # The upload comes after the build.
    run_at = next(i for i, step in enumerate(steps(job)) if command in step.get("run", ""))
    assert steps(job).index(upload) > run_at


def test_a_job_deploys_the_build_to_pages_from_main_only(workflow):
    build = the_job(workflow, "builds the book", lambda job: readme_command("book") in commands(job))
    name = the_job(workflow, "deploys to Pages", lambda job: uses(job, "actions/deploy-pages"))
    job = workflow["jobs"][name]
    assert needs(job) == [build]
    [deploy] = uses(job, "actions/deploy-pages")
    assert deploy["uses"] == "actions/deploy-pages@v4"
    assert job["permissions"] == {"pages": "write", "id-token": "write"}
    assert job["environment"] == {"name": "github-pages", "url": "${{ steps.%s.outputs.page_url }}" % deploy["id"]}
    assert job["concurrency"]["group"] == "pages"
    # Never from a pull request; only main is published.
    assert "github.event_name != 'pull_request'" in job["if"]
    assert "github.ref == 'refs/heads/main'" in job["if"]
    # Only the deploy job may write anything.
    others = [other for other_name, other in workflow["jobs"].items() if other_name != name]
    assert all("permissions" not in other for other in others)


def test_a_job_grades_the_assignments_and_keeps_them(workflow):
    jobs = [job for job in workflow["jobs"].values()
            if any(step.get("run") == "make assignments-test" for step in job["steps"])]
    assert len(jobs) == 1
    (job,) = jobs
    assert job["needs"] == "test"
    runs = [step.get("run") for step in job["steps"]]
    assert runs.index("make assignments") > runs.index("make assignments-test")
    upload = [step for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload and upload[0]["with"]["path"] == "_build/assignments"
