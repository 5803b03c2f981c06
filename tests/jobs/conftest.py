"""The job tests' copy of the repository, as a user's fresh clone has it.

The suite runs on two pytest-xdist workers (``-n 2 --dist loadfile`` in pyproject.toml):
the job tests are long subprocesses that leave a core partly idle while Ray starts,
imports and polls. A test file runs on one worker, in order, on its own clone, so a
test finds the stages an earlier one of its file made; the job tests are split into
files of similar length for the two workers. (``--dist loadgroup`` would group by
marks, but with pytest 9.2 and pytest-xdist 3.8 the groups did not reach the node ids
that xdist schedules by: grouped tests ran on both workers.)
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

