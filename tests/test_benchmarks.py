"""The benchmark suite's documented commands run and write every table."""

import json
import pathlib
import subprocess
import sys

import pytest

SUITE = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "suite.py"
SECTIONS = [
    "### Targets",
    "### Standalone clip_by_global_norm",
    "#### Against PyTorch",
    "### Clippers inside a jitted AdamW step",
    "### Compile time against the number of leaves",
    "### Per-example clipping",
    "### Standalone clip_by_value",
    "### Robust global norm",
]


def run_suite(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_quick_suite_writes_every_table_and_renders_an_accelerator(tmp_path):
    run_suite("--quick", "--out", str(tmp_path))
    text = (tmp_path / "suite.md").read_text()
    for section in SECTIONS:
        assert section in text
    results = json.loads((tmp_path / "suite.json").read_text())
    assert len(results["targets"]) == 9
    # compile rows for the global clip and for each per-leaf or per-unit clipper
    compiled = {row["clipper"] for row in results["compile"]}
    assert compiled == {"clip_by_global_norm", "clip_by_norm", "agc"}
    assert all(
        "total_s" in row[impl] for row in results["compile"] for impl in ("jaxclip", "optax")
    )
    assert all(t["met"] in (True, False, None) for t in results["targets"])
    # the per-example contenders must agree before their times mean anything
    assert results["per_example"]["results_agree"] is True
    steps = results["step"]["times"]
    assert {"AdamW alone", "jaxclip.skip_on_spike", "optax.apply_if_finite"} <= set(steps)
    # the floor of a norm clipper in the step: AdamW alone plus one read of the gradient
    step = results["step"]
    alone, read = steps["AdamW alone"]["median_ms"], step["one_read"]["median_ms"]
    assert step["floor_over_adamw"] == pytest.approx((alone + read) / alone)
    assert all(t["over_floor"] > 0 for t in steps.values())
    if sys.platform.startswith("linux"):  # page faults are counted where getrusage has them
        assert all(t["fresh_mb"] >= 0 for t in steps.values())

    # the same results, re-rendered as if measured on a GPU
    results["machine"].update(accelerator="NVIDIA H200", peak_gbps=4800.0, torch_device="cuda")
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "suite.json").write_text(json.dumps(results))
    run_suite("--render", "--out", str(gpu))
    text = (gpu / "suite.md").read_text()
    assert text.startswith("Measured on NVIDIA H200 (peak 4,800 GB/s), host ")
    assert "| of peak |" in text
    assert "on CUDA tensors" in text
    for section in SECTIONS:
        assert section in text


def test_peak_bandwidth_comes_from_the_flag_then_the_table(monkeypatch):
    monkeypatch.syspath_prepend(str(SUITE.parent))
    from common import peak_gbps

    assert peak_gbps("NVIDIA H100 80GB HBM3", None) == 3350
    assert peak_gbps("NVIDIA A100-SXM4-40GB", None) == 1555
    assert peak_gbps("NVIDIA H100 80GB HBM3", 3000.0) == 3000.0
    assert peak_gbps("Some Future Card", None) is None


@pytest.mark.slow
def test_zero_units_script_times_every_clipper_on_every_gradient(tmp_path):
    out = tmp_path / "zero_units.json"
    script = SUITE.parent / "zero_units.py"
    small = ["--rounds", "2", "--layers", "1", "--d-model", "32", "--vocab", "64"]
    proc = subprocess.run(
        [sys.executable, str(script), *small, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=SUITE.parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {
        "no zero unit",
        "one zero bias",
        "every other embedding row zero",
        "one zero large leaf",
    }
    for per_clipper in results.values():
        assert set(per_clipper) == {"clip_by_global_norm", "clip_by_norm", "clip_by_norm(axis=-1)"}
        assert per_clipper["clip_by_global_norm"]["ratio_vs_clip_by_global_norm"] == 1.0
        assert all(r["median_ms"] > 0 for r in per_clipper.values())
