"""The repository documents itself: every docs/ reference resolves inside it, none points outside."""

from __future__ import annotations

import re
import subprocess

DOC_REF = re.compile(r"docs/([\w.-]+\.md)(?:[`'\"]*,? *\"([^\"]+)\")?")


def _tracked_text_files(repo_root):
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=repo_root,
                           capture_output=True, text=True, check=True).stdout.split()
    return [repo_root / n for n in names if n.endswith((".py", ".md", ".yaml", ".toml")) and (repo_root / n).is_file()]


def test_docs_references_resolve_to_files_and_sections(repo_root):
    """``docs/methods.md`` and ``(docs/architecture.md, "The flow")`` must exist in the repository."""
    missing = []
    for path in _tracked_text_files(repo_root):
        for match in DOC_REF.finditer(path.read_text()):
            doc = repo_root / "docs" / match.group(1)
            if not doc.is_file():
                missing.append(f"{path.relative_to(repo_root)} -> docs/{match.group(1)}")
            elif match.group(2) and match.group(2) not in doc.read_text():
                missing.append(f"{path.relative_to(repo_root)} -> docs/{match.group(1)} section {match.group(2)!r}")
    assert not missing, missing


def test_nothing_points_outside_the_repository(repo_root):
    pattern = re.compile("|".join(re.escape(s) for s in ("../" + "shared", "/work/" + "shared", "/work/" + "main")))
    outside = [str(p.relative_to(repo_root)) for p in _tracked_text_files(repo_root) if pattern.search(p.read_text())]
    assert not outside, outside
