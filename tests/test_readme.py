"""The README's quick start and .ci/run agree on the test command."""

from __future__ import annotations


def test_ci_runs_exactly_the_readme_test_command(repo_root):
    readme = (repo_root / "README.md").read_text()
    ci_lines = [line for line in (repo_root / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci_lines) == 1
    assert ci_lines[0] in readme
    assert "pytest" in ci_lines[0]


def test_readme_quick_start_runs_the_demo_job(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert "jobs/shapes_demo.py" in readme
    assert (repo_root / "jobs" / "shapes_demo.py").is_file()
