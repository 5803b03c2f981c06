"""The job's code on every Ray node: the driver's ``ovdlab``, staged once and shipped as a ``py_modules`` entry.

``ray job submit --working-dir .`` gives every worker a copy of the repository's folders,
but the ``ovdlab.*`` import names come from packaging (``setup.py`` maps ``platform/``
onto ``ovdlab.platform``), so a worker node that never installed ovdlab cannot import a
single task, actor or Ray Train worker of the job. The driver therefore copies the
package it imported itself into a folder named ``ovdlab`` and adds that folder to the
job's ``runtime_env`` ``py_modules``: Ray zips it, uploads it to the cluster once per
content hash and puts it on the ``PYTHONPATH`` of every worker of the job, on any node.
Workers thus run exactly the driver's code, whatever (if anything) their node installed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACKAGE = "ovdlab"
SUBPACKAGES = ("platform", "methods", "jobs")
"""``ovdlab.<name>`` for each: the folders ``setup.py`` maps onto the import name."""
CONFIGS = "configs"
"""Shipped beside them: ``platform/config.py`` finds ``configs/`` next to its package folder."""
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the environment of a ``ray job submit`` entrypoint."""
OVERRIDE_JOB_RUNTIME_ENV = "RAY_OVERRIDE_JOB_RUNTIME_ENV"
"""Lets ``ray.init``'s ``py_modules`` replace the submitted job's (ours lists theirs too)."""


@dataclass(frozen=True)
class StagedPackage:
    """A staged copy of the package: ``path`` is the ``ovdlab`` folder that goes into ``py_modules``."""

    path: Path
    digest: str
    files: int
    size_bytes: int
    built: bool
    """False when an earlier job staged the same content and this one reuses it."""


def staging_root() -> Path:
    """One folder per user under the system's temporary directory (a rerun finds its copy there)."""
    return Path(tempfile.gettempdir()) / f"ovdlab-code-{os.getuid()}"


def imported_sources() -> dict[str, Path]:
    """Top-level name in the package (``platform``, ..., ``configs``) -> the folder the driver imported it from.

    Read from the imported modules rather than the current directory: under ``ray job
    submit`` the driver runs in Ray's copy of the working dir but imports the ovdlab its
    Python environment installed, and the workers must run that same code. Of several
    folders (a copy on ``PYTHONPATH`` before an install) the first is the one imports use.
    """
    from ovdlab.platform.config import CONFIGS_DIR

    sources: dict[str, Path] = {}
    for name in SUBPACKAGES:
        module = importlib.import_module(f"{PACKAGE}.{name}")
        folders = [Path(entry) for entry in module.__path__ if Path(entry).is_dir()]
        if not folders:
            raise RuntimeError(f"{PACKAGE}.{name} is not imported from a folder ({list(module.__path__)})")
        sources[name] = folders[0]
    if CONFIGS_DIR.is_dir():
        sources[CONFIGS] = CONFIGS_DIR
    return sources


def package_files(sources: dict[str, Path]) -> dict[str, bytes]:
    """Path inside the package (``platform/cluster.py``) -> content; no bytecode caches, no hidden files.

    Contents are read once, so the digest and the staged copy agree even while someone
    edits the checkout.
    """
    files: dict[str, bytes] = {}
    for name, folder in sources.items():
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and not _skipped(relative):
                files[f"{name}/{relative.as_posix()}"] = path.read_bytes()
    return files


def _skipped(relative: Path) -> bool:
    hidden_or_cache = any(part == "__pycache__" or part.startswith(".") for part in relative.parts)
    return hidden_or_cache or relative.suffix in {".pyc", ".pyo"}


def content_digest(files: dict[str, bytes]) -> str:
    """sha256 over the sorted paths and their contents: equal code, equal digest, one staged copy."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def stage_package(sources: dict[str, Path] | None = None, root: Path | None = None) -> StagedPackage:
    """The staged ``<root>/<digest>/ovdlab`` of ``sources`` (default: the imported package), built if absent."""
    files = package_files(imported_sources() if sources is None else sources)
    digest = content_digest(files)
    home = (staging_root() if root is None else root) / digest[:16]
    built = not (home / PACKAGE).is_dir()
    if built:
        _build(home, files)
    return StagedPackage(home / PACKAGE, digest, len(files), sum(map(len, files.values())), built)


def _build(home: Path, files: dict[str, bytes]) -> None:
    """Write into a private folder, then rename it: a job staging the same digest concurrently
    sees a complete copy or none."""
    home.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f"{home.name}.", dir=home.parent))
    for name, content in files.items():
        target = private / PACKAGE / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    try:
        private.rename(home)
    except OSError:
        shutil.rmtree(private)
        if not (home / PACKAGE).is_dir():
            raise


def submitted_py_modules() -> list[str]:
    """The ``py_modules`` of the ``ray job submit`` runtime env this driver runs under (usually none)."""
    submitted = json.loads(os.environ.get(SUBMITTED_JOB_ENV) or "{}")
    return list((submitted.get("runtime_env") or {}).get("py_modules") or [])


def with_shipped_code(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """``runtime_env`` plus the staged package in ``py_modules``, after the caller's and the submitted job's.

    Ray refuses a ``ray.init`` runtime env that repeats a field of the submitted job's,
    so the job's own ``py_modules`` are listed here too and :data:`OVERRIDE_JOB_RUNTIME_ENV`
    must be set for that ``ray.init`` when there are any (see ``init_ray``).
    """
    staged = stage_package()
    log.info(
        "shipping ovdlab to every node of the job: %s (%d files, %.0f KiB, sha256 %s, %s)",
        staged.path, staged.files, staged.size_bytes / 1024, staged.digest[:16],
        "staged now" if staged.built else "staged by an earlier run, reused",
    )
    warn_if_working_dir_differs(staged.digest)
    shipped = dict(runtime_env or {})
    shipped["py_modules"] = [*submitted_py_modules(), *shipped.get("py_modules", []), str(staged.path)]
    return shipped


def warn_if_working_dir_differs(digest: str, cwd: Path | None = None) -> bool:
    """Warn (and return True) when a submitted ovdlab checkout holds other code than the driver imported.

    The driver of ``ray job submit`` imports the ovdlab installed on the head node, not
    the submitted working dir, and ships that; edits made only in the submitted copy would
    silently not run.
    """
    cwd = Path.cwd() if cwd is None else cwd
    names = (*SUBPACKAGES, CONFIGS)
    if SUBMITTED_JOB_ENV not in os.environ or not all((cwd / name).is_dir() for name in names):
        return False
    if content_digest(package_files({name: cwd / name for name in names})) == digest:
        return False
    log.warning(
        "the submitted working dir %s holds other ovdlab code than the driver imported and ships to the "
        "workers (%s); install the checkout you submit on the head node (pip install -e .)",
        cwd, ", ".join(str(path) for path in imported_sources().values()),
    )
    return True
