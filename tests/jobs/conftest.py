"""The job tests' copy of the repository, as a user's fresh clone has it, and their two groups.

The suite runs on two pytest-xdist workers (``-n 2 --dist loadgroup`` in pyproject.toml):
the job tests are long subprocesses that leave a core partly idle while Ray starts,
imports and polls. They form two groups, each on one worker with its own clone, so
that a test reusing the stages an earlier one made (the CLIFF sweep reusing the CLIFF
job's proposal detector) finds them: the tests on a clone of EZSD's and CLIFF's jobs and
the two-node cluster in one, the other tests on a clone in the other. Other tests spread
freely.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def clone(tmp_path_factory, repo_root) -> Path:
    """The repository's files as a fresh clone has them (tracked, plus new files not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo_root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    dest = tmp_path_factory.mktemp("clone") / "ovdlab"
    for name in filter(None, listed):
        src = repo_root / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    assert not (dest / "work").exists() and (dest / "jobs" / "shapes_demo.py").is_file()
    return dest


METHOD_JOBS = ("ezsd", "cliff", "two_node")
"""Test names that put a job test in the second group (see the module doc)."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "clone" not in getattr(item, "fixturenames", ()):
            continue
        group = "method-jobs" if any(word in item.name for word in METHOD_JOBS) else "platform-jobs"
        item.add_marker(pytest.mark.xdist_group(group))
