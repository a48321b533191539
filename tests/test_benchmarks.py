"""The throughput benchmark: FLOP counts against published numbers, and one small end-to-end run."""

import json
import statistics
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import throughput  # noqa: E402


@pytest.mark.parametrize("name, gflops", [("Ti/16", 2.51), ("B/16", 35.1), ("L/16", 123.2)])
def test_forward_flops_match_the_published_counts(name, gflops):
    # 2 x the multiply-adds that timm / fvcore report at 224 px (B/16: 17.6 GMACs; L/16: 61.6).
    spec = throughput.architecture(name, 224, 1000)
    assert throughput.forward_flops(spec) / 1e9 == pytest.approx(gflops, rel=0.005)


def test_benchmark_runs_inference_and_remat_training_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--cells", "inference Ti/16 2", "train Ti/16 2",
        "--precisions", "float32", "--xla", "off", "--remat", "--image-size", "32", "--classes", "10",
        "--runs", "2", "--warmup", "1", "--pause", "0", "--matmul-size", "128", "--json", str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["workload"], r["remat"]) for r in rows] == [("inference", False), ("train", False), ("train", True)]
    for row in rows:
        assert len(row["runs"]) == 2 and row["images_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["images_per_s"] == pytest.approx(2 / statistics.median(row["runs"])) and row["xla"] is False
    assert "| inference | Ti/16 | 2 | float32 | keras_vit | off | no |" in result.stdout
