"""The job tests' copy of the repository, as a user's fresh clone has it."""

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
