"""benchmarks/gpu_suite.sh and its collector, benchmarks/gpu_report.py, on the CPU (no GPU needed).

The whole `--dry-run` takes ~2 minutes on a 2-core box (two model processes for the training-step part, one for
the SST-2 job), too long for the suite; so the collector is checked on hand-made part outputs, and the script
end to end on one fast part (`--dry-run --only dequant`, Triton in its interpreter at 128x256).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_report  # noqa: E402


def write_parts(out: Path, **rcs) -> None:
    lines = [json.dumps({"part": name, "rc": rc, "seconds": 12.5, "cap_s": 60, "command": ["python", name]})
             for name, rc in rcs.items()]
    (out / "parts.jsonl").write_text("\n".join(lines) + "\n")


def write_outputs(out: Path, triton_ms: float = 0.2, sst2_acc: float = 0.91) -> None:
    (out / "tests.xml").write_text('<testsuites><testsuite name="pytest" tests="10" failures="1" errors="0" '
                                   'skipped="2"/></testsuites>')
    (out / "dequant.json").write_text(json.dumps({"environment": {"device_name": "H200"}, "copy_gbps": 4000.0,
                                                  "rows": [
        {"shape": "4096x4096", "impl": "bnb", "ms": 0.030, "gbps": 3000.0},
        {"shape": "4096x4096", "impl": "triton", "ms": 0.025, "gbps": 3600.0}]}))
    matmul = []
    for m, dense_ms, ours_ms in ((1, 1.0, triton_ms), (512, 0.1, triton_ms / 2)):
        for impl, ms in (("dense", dense_ms), ("ours-triton", ours_ms), ("bnb", 2 * dense_ms),
                         ("ours-auto", dense_ms)):
            matmul.append({"shape": "4096x4096", "m": m, "pass": "fwd", "impl": impl, "ms": ms, "tflops": 100.0,
                           "chosen": "triton" if impl == "ours-auto" else None})
    (out / "matmul.json").write_text(json.dumps({"environment": {}, "rows": matmul, "skipped": {}}))
    (out / "train_smollm2-135m.json").write_text(json.dumps({"args": {"model": "smollm2-135m"}, "rows": [
        {"side": "peer", "step_s": 0.1},
        {"side": "ours", "step_s": 0.06, "time_vs_peer": 0.6, "mem_vs_peer": 0.9, "cuda_peak_gb": 1.0}]}))
    (out / "sst2").mkdir()
    (out / "sst2" / "metrics.json").write_text(json.dumps({"fine_tuned": {"accuracy": sst2_acc},
                                                           "zero_shot": {"accuracy": 0.6}, "train": {"steps": 750},
                                                           "device": "cuda:0"}))


def goals(report: dict) -> dict[str, object]:
    return {r["what"]: r["met"] for r in report["rows"]}


def test_report_states_each_goal_and_whether_it_is_met(tmp_path):
    write_parts(tmp_path, tests=1, dequant=0, matmul=0, **{"train_smollm2-135m": 0, "train_gemma3-270m": 124},
                sst2=0)
    write_outputs(tmp_path)
    report = gpu_report.collect(tmp_path, dry_run=False)
    met = goals(report)
    assert met["tests/gpu"] is False                                                   # 1 failure
    assert met["dequantize 4096x4096 -> bf16, triton vs copy"] is True                 # 90% of copy
    assert met["dequantize 4096x4096 -> bf16, triton vs bnb"] is True                  # 1.2x
    assert met["forward 4096x4096 M=1, triton"] is True                                # 5x faster than dense
    assert met["forward 4096x4096 M=512, triton"] is True                              # 1.0x cuBLAS' time
    assert met["QLoRA step smollm2-135m: time"] is True and met["QLoRA step smollm2-135m: memory"] is False
    assert met["SST-2 main job (examples/sst2.py)"] is True                             # 0.91 in 12.5 s
    gemma = next(r for r in report["rows"] if r["part"] == "train_gemma3-270m")
    assert gemma["met"] is None and "stopped at its cap (60 s)" in gemma["note"]
    assert report["summary"] == {"met": 6, "not_met": 2, "n_a": 1}


def test_slow_kernels_and_a_low_accuracy_are_not_met(tmp_path):
    write_parts(tmp_path, sst2=0)
    write_outputs(tmp_path, triton_ms=0.5, sst2_acc=0.85)
    met = goals(gpu_report.collect(tmp_path, dry_run=False))
    assert met["forward 4096x4096 M=1, triton"] is False                               # 2x, goal 2.5x
    assert met["forward 4096x4096 M=512, triton"] is False                             # 2.5x cuBLAS' time
    assert met["SST-2 main job (examples/sst2.py)"] is False


def test_missing_parts_are_rows_that_say_why(tmp_path):
    write_parts(tmp_path, tests=0, dequant=124, matmul=1)
    report = gpu_report.collect(tmp_path, dry_run=True)
    notes = {r["part"]: r["note"] for r in report["rows"]}
    assert notes["dequant"] == "no result: stopped at its cap (60 s)"
    assert notes["matmul"] == "no result: failed (exit 1)"
    assert notes["sst2"] == "no result: not run"
    assert all(r["met"] is None for r in report["rows"])


def test_markdown_has_a_goal_table_and_the_command_of_each_part(tmp_path):
    write_parts(tmp_path, dequant=0)
    write_outputs(tmp_path)
    text = gpu_report.markdown(gpu_report.collect(tmp_path, dry_run=True))
    assert text.startswith("# GPU suite (DRY RUN")
    assert "| dequant | dequantize 4096x4096 -> bf16, triton vs copy | 3600 GB/s = 90% of copy (4000 GB/s) " in text
    assert "| dequant | ok | 12 / 60 | `python dequant` |" in text


def test_script_rejects_an_unknown_argument():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--gpus", "2"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown argument '--gpus'" in done.stderr


@pytest.mark.slow   # ~15 s: one interpreter-run benchmark in a subprocess
def test_dry_run_of_one_part_writes_the_json_and_the_table(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--only", "dequant",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["dry_run"] and [p["part"] for p in report["parts"]] == ["dequant"]
    assert {r["what"] for r in report["rows"] if r["part"] == "dequant"} == {
        "dequantize 128x256 -> bf16, triton vs copy", "dequantize 128x256 -> bf16, triton vs bnb"}
    assert (tmp_path / "gpu_suite.md").read_text().startswith("# GPU suite (DRY RUN")
