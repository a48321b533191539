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


@pytest.mark.slow
def test_benchmark_runs_inference_and_remat_training_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--cells", "inference Ti/16 2", "train Ti/16 2",
        "--precisions", "float32", "--xla", "off", "--remat", "--loops", "trainer,fit", "--image-size", "32", "--classes", "10",
        "--runs", "2", "--warmup", "1", "--pause", "0", "--matmul-size", "128", "--json", str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["workload"], r["loop"], r["remat"]) for r in rows] == [
        ("inference", None, False), ("train", "trainer", False), ("train", "fit", False), ("train", "trainer", True)
    ]
    for row in rows:
        assert len(row["runs"]) == 2 and row["images_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["images_per_s"] == pytest.approx(2 / statistics.median(row["runs"])) and row["xla"] is False
    assert "| inference | Ti/16 | 2 | float32 | keras_vit | - | off | no |" in result.stdout
    assert "| train | Ti/16 | 2 | float32 | keras_vit | fit | off | no |" in result.stdout
    report = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--report", str(out)], capture_output=True, text=True
    )
    assert report.returncode == 0 and "| train | Ti/16 | 2 | float32 | keras_vit | fit | off | no |" in report.stdout


@pytest.mark.slow
def test_engines_run_the_verified_exports_beside_keras_vit_and_the_json_names_the_cpu(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "engines.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--cells", "inference Ti/16 2", "--precisions",
        "float32,mixed_bfloat16", "--xla", "off", "--engines", "openvino,onnxruntime", "--image-size", "32",
        "--classes", "10", "--runs", "2", "--warmup", "1", "--pause", "0", "--matmul-size", "128", "--json", str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(out.read_text())
    rows = {(r["precision"], r["framework"]) for r in saved["rows"]}
    assert rows == {("float32", "keras_vit"), ("float32", "openvino"), ("float32", "onnxruntime"),
                    ("mixed_bfloat16", "keras_vit"), ("mixed_bfloat16", "openvino")}  # ONNX Runtime: float32 only
    assert "onnxruntime runs the float32 export only" in result.stderr
    machine = saved["machine"]
    assert machine["cpu"] and machine["cpu_kind"] in (None, "amx", "avx512_bf16", "avx2") and len(machine["load_average"]) == 3
    assert set(machine["cpu_flags"]) <= set(throughput.SPEED_FLAGS)


def test_xla_auto_is_on_for_float32_and_off_for_bfloat16():
    assert throughput.xla_settings("auto", "float32") == [True]
    assert throughput.xla_settings("auto", "mixed_bfloat16") == [False]
    assert throughput.xla_settings("on,off", "float32") == [True, False]
    with pytest.raises(SystemExit, match="auto"):
        throughput.xla_settings("maybe", "float32")


@pytest.mark.slow
def test_saved_tensors_lists_what_the_backward_pass_keeps(tmp_path):
    # Ti/16 at 32 px, batch 2: 4 tokens + class token; per block the GELU input and output are kept
    # (Dense_0's BiasAdd and GELU's Mul, (B*T, M) = (10, 768)), the attention probabilities are not.
    out = tmp_path / "saved.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "saved_tensors.py"), "--model", "Ti/16", "--batch", "2",
        "--image-size", "32", "--classes", "10", "--json", str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]["keras_vit"]
    wide = {(r["where"], r["op"]): r["count"] for r in rows if r["shape"] == "[10, 768]"}
    assert wide == {("Dense_0", "BiasAdd"): 12, ("Gelu", "Mul"): 12}
    assert not [r for r in rows if r["op"] in ("Softmax", "Tanh")]
    assert "keras_vit:" in result.stdout and "MiB kept for the backward pass" in result.stdout
