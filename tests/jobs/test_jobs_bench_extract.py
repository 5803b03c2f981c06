"""The extraction benchmark runs end to end on a tiny world and prints every figure."""

from __future__ import annotations

import re

import pytest

from ovdlab.jobs import bench_extract


@pytest.mark.slow
def test_bench_extract_prints_all_four_figures(tmp_path, ray_local, capsys):
    """24 images through the tiny teacher's CLIP-proposal workload (ViT-B-32 skipped).

    The loop's store is checked against the pipeline's inside the benchmark
    (``same_regions``); here every figure must be printed with a finite value and a verdict.
    """
    assert bench_extract.main(["--work-dir", str(tmp_path), "--tiny-images", "24", "--skip-vit"]) == 0
    out = capsys.readouterr().out
    for figure in (
        r"1\. pipeline / best loop   = \d+\.\d+ .*after start-up \d+\.\d+",
        r"2\. batched, 1 thread  / PIL = \d+\.\d+x",
        r"3\. store bytes / raw fp16 = 0\.\d+",
        r"4\. lookup p50 / p99       = \d+\.\d+ / \d+\.\d+ ms",
    ):
        assert re.search(figure, out), f"missing {figure!r} in:\n{out}"
    assert "24 images, 2400 regions" in out
    verdicts = re.findall(r"target [<>]= [\d.]+: (met|MISSED)", out)
    assert len(verdicts) == 7  # ratio 1, four crop rows (two images x two thread counts), bytes, lookup
