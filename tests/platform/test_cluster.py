"""A local Ray started by ``ensure_ray`` serves the State API that Ray Train V2 polls."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import ray
from ray.util.state import list_nodes
from ovdlab.platform.cluster import ensure_ray
from ovdlab.platform.config import load_config

ensure_ray(load_config(None, []))
ensure_ray(load_config(None, []))  # a second call keeps the running Ray
print("nodes", len(list_nodes(address=ray.get_runtime_context().gcs_address, timeout=30)))
ray.shutdown()
"""


def test_local_ray_serves_the_state_api(tmp_path):
    """Without the dashboard, ``list_nodes`` (like Train V2's placement-group cleaner) fails."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nodes 1" in out.stdout
