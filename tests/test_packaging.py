"""The standard library ``platform`` module stays intact wherever ovdlab runs.

Our ``platform/`` folder has no ``__init__.py`` and is importable only as
``ovdlab.platform``; a regular package there would shadow the standard library
module that torch and ray use.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()

CHECK = textwrap.dedent(
    """
    import platform, pathlib, sysconfig
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert pathlib.Path(platform.__file__).resolve().parent == stdlib, platform.__file__
    assert platform.system()
    import torch, ray
    import ovdlab.platform.config, ovdlab.platform.cli
    """
)


def test_no_init_in_top_level_folders(repo_root):
    for folder in ("platform", "methods", "jobs"):
        assert not (repo_root / folder / "__init__.py").exists(), folder


def test_stdlib_platform_in_this_pytest():
    import platform

    assert Path(platform.__file__).resolve().parent == STDLIB
    assert platform.python_version()


def test_stdlib_platform_under_python_c_from_repo_root(repo_root):
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_stdlib_platform_under_python_m_pytest(repo_root, tmp_path):
    test_file = tmp_path / "test_inner_platform.py"
    test_file.write_text("def test_platform():\n" + textwrap.indent(CHECK, "    "))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "1 passed" in out.stdout


@pytest.mark.slow
def test_stdlib_platform_inside_ray_task_with_working_dir(repo_root):
    body = textwrap.indent(CHECK + "import os\nreturn platform.__file__, os.getcwd()\n", "    ")
    script = (
        "import ray\n"
        f"ray.init(address='local', num_cpus=1, include_dashboard=False, runtime_env={{'working_dir': {str(repo_root)!r}}})\n"
        "@ray.remote(num_cpus=0.5)\n"
        "def probe():\n"
        f"{body}"
        "path, cwd = ray.get(probe.remote())\n"
        "print('PLATFORM', path)\n"
        "print('CWD', cwd)\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    path = out.stdout.split("PLATFORM", 1)[1].split()[0]
    assert Path(path).resolve().parent == STDLIB
    cwd = out.stdout.split("CWD", 1)[1].split()[0]
    assert "runtime_resources" in cwd or "working_dir" in cwd
