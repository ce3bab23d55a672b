"""Merges the GPU suite's parts (benchmarks/gpu_suite.sh) into one JSON and one markdown table of goals.

    python benchmarks/gpu_report.py OUT_DIR [--dry-run]      # reads OUT_DIR/*, writes OUT_DIR/gpu_suite.{json,md}

What it reads (each part may be missing, failed or stopped at its cap; its rows then say so):
    parts.jsonl              one line per part: name, exit status, seconds, cap, command (written by the script)
    tests.xml                pytest's JUnit report of tests/gpu
    dequant.json             bench_dequant.py: GB/s per shape and impl, the copy bandwidth measured beside it
    matmul.json              bench_matmul.py: ms per shape, M, pass and impl (dense = cuBLAS on the bf16 weight)
    train_<model>.json       bench_train_step.py: ours vs PEFT + bitsandbytes, step time and peak memory
    sst2/metrics.json        examples/sst2.py: the main job's accuracy (its wall time is the part's seconds)
Every goal row: what was measured, the goal, and whether it is met (yes / NO / n/a when not measured).
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for lora.atomic
from lora.atomic import atomic_write  # noqa: E402

DEQUANT_COPY, DEQUANT_VS_BNB = 0.80, 1.15       # >= 80% of copy bandwidth, >= 1.15x bitsandbytes
MATMUL_LARGE_M, LARGE_VS_DENSE = 512, 1.15      # M >= 512: time <= 1.15x cuBLAS bf16
DECODE_SPEEDUP = 2.5                            # M = 1: >= 2.5x faster than bf16 dense
TRAIN_TIME, TRAIN_MEM = 0.7, 0.8                # <= 0.7x PEFT's step time, <= 0.8x its peak memory
SST2_ACC, SST2_SECONDS = 0.90, 180.0            # >= 0.90 in <= 3 minutes


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_parts(out: Path) -> dict[str, dict]:
    parts = {}
    if (out / "parts.jsonl").is_file():
        for line in (out / "parts.jsonl").read_text().splitlines():
            if line.strip():
                part = json.loads(line)
                parts[part["part"]] = part
    return parts


def status(part: dict | None) -> str:
    if part is None:
        return "not run"
    if part["rc"] in (124, 137):
        return f"stopped at its cap ({part['cap_s']} s)"
    return "ok" if part["rc"] == 0 else f"failed (exit {part['rc']})"


def row(part, what, measured, goal, met, note=""):
    return {"part": part, "what": what, "measured": measured, "goal": goal, "met": met, "note": note}


def missing(part_name, what, goal, parts):
    return row(part_name, what, "—", goal, None, f"no result: {status(parts.get(part_name))}")


# ----------------------------------------------------------------------------------------------------------
# one function per part: its goal rows


def test_rows(out: Path, parts: dict) -> list[dict]:
    goal = "every GPU test passes"
    try:
        suite = ET.parse(out / "tests.xml").getroot()
    except (OSError, ET.ParseError):
        return [missing("tests", "tests/gpu", goal, parts)]
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    measured = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    bad = n["failures"] + n["errors"]
    met = False if bad else (True if passed else None)
    return [row("tests", "tests/gpu", measured, goal, met, "" if passed or bad else "all skipped (no GPU)")]


def dequant_rows(out: Path, parts: dict) -> list[dict]:
    data = load_json(out / "dequant.json")
    if data is None:
        return [missing("dequant", "NF4 dequantize", f">= {DEQUANT_COPY:.0%} of copy, >= {DEQUANT_VS_BNB}x bnb",
                        parts)]
    rows, copy = [], data["copy_gbps"]
    for shape in dict.fromkeys(r["shape"] for r in data["rows"]):
        by = {r["impl"]: r for r in data["rows"] if r["shape"] == shape}
        t, bnb = by.get("triton"), by.get("bnb")
        what = f"dequantize {shape} -> bf16, triton"
        if t is None:
            rows.append(row("dequant", what, "—", "", None, data.get("skipped", {}).get("triton", "not run")))
            continue
        same = t.get("copy_gbps", copy)                  # a copy of as many bytes, measured beside it
        rows.append(row("dequant", what + " vs copy", f"{t['gbps']:.0f} GB/s = {t['gbps'] / same:.0%} of copy "
                        f"({same:.0f} GB/s)", f">= {DEQUANT_COPY:.0%} of copy", t["gbps"] / same >= DEQUANT_COPY))
        if bnb is not None:
            speedup = bnb["ms"] / t["ms"]
            rows.append(row("dequant", what + " vs bnb", f"{speedup:.2f}x bnb ({bnb['gbps']:.0f} GB/s)",
                            f">= {DEQUANT_VS_BNB}x bnb", speedup >= DEQUANT_VS_BNB))
    return rows


def matmul_rows(out: Path, parts: dict) -> list[dict]:
    data = load_json(out / "matmul.json")
    if data is None:
        return [missing("matmul", "fused NF4 matmul", "see bench_matmul", parts)]
    rows = []
    keys = dict.fromkeys((r["shape"], r["m"], r["pass"]) for r in data["rows"])
    for shape, m, pass_name in keys:
        by = {r["impl"]: r for r in data["rows"] if (r["shape"], r["m"], r["pass"]) == (shape, m, pass_name)}
        if m != 1 and m < MATMUL_LARGE_M:
            continue                                  # M = 16 is in the JSON; no goal for it
        what = f"{'forward' if pass_name == 'fwd' else 'input gradient'} {shape} M={m}, triton"
        t, dense = by.get("ours-triton"), by["dense"]
        if t is None:
            rows.append(row("matmul", what, "—", "", None, data.get("skipped", {}).get("ours-triton", "not run")))
            continue
        note = auto_note(by, dense)
        if m == 1:
            speedup = dense["ms"] / t["ms"]
            rows.append(row("matmul", what, f"{speedup:.2f}x faster than bf16 dense ({t['ms'] * 1e3:.0f} us)",
                            f">= {DECODE_SPEEDUP}x faster than bf16 dense", speedup >= DECODE_SPEEDUP, note))
        else:
            ratio = t["ms"] / dense["ms"]
            rows.append(row("matmul", what, f"{ratio:.2f}x cuBLAS bf16's time ({t['tflops']:.0f} TFLOP/s)",
                            f"<= {LARGE_VS_DENSE}x cuBLAS bf16", ratio <= LARGE_VS_DENSE, note))
    return rows


def auto_note(by: dict, dense: dict) -> str:
    auto, bnb = by.get("ours-auto"), by.get("bnb")
    parts = []
    if auto is not None:
        parts.append(f"backend=None chose {auto.get('chosen') or '?'}: {dense['ms'] / auto['ms']:.2f}x dense speed")
    if bnb is not None:
        parts.append(f"bnb {dense['ms'] / bnb['ms']:.2f}x")
    return "; ".join(parts)


def train_rows(out: Path, parts: dict) -> list[dict]:
    rows = []
    for path in sorted(out.glob("train_*.json")):
        data = load_json(path)
        model = (data or {}).get("args", {}).get("model", path.stem)
        ours = next((r for r in (data or {}).get("rows", []) if r["side"] == "ours" and "time_vs_peer" in r), None)
        if ours is None:
            rows.append(missing(path.stem, f"training step {model}", "vs PEFT + bnb", parts))
            continue
        mem = "CUDA max allocated" if ours.get("cuda_peak_gb") is not None else "peak RSS"
        rows.append(row(path.stem, f"QLoRA step {Path(model).name}: time", f"{ours['time_vs_peer']:.2f}x PEFT's "
                        f"({ours['step_s'] * 1e3:.0f} ms)", f"<= {TRAIN_TIME}x PEFT + bnb",
                        ours["time_vs_peer"] <= TRAIN_TIME))
        rows.append(row(path.stem, f"QLoRA step {Path(model).name}: memory", f"{ours['mem_vs_peer']:.2f}x PEFT's "
                        f"({mem})", f"<= {TRAIN_MEM}x PEFT + bnb", ours["mem_vs_peer"] <= TRAIN_MEM))
    expected = [name for name in parts if name.startswith("train_")]
    seen = {path.stem for path in out.glob("train_*.json")}
    rows += [missing(name, f"training step ({name})", "vs PEFT + bnb", parts) for name in expected if name not in seen]
    return rows


def sst2_rows(out: Path, parts: dict) -> list[dict]:
    goal = f">= {SST2_ACC:.2f} in <= {SST2_SECONDS / 60:.0f} min"
    metrics, part = load_json(out / "sst2" / "metrics.json"), parts.get("sst2")
    if metrics is None or part is None:
        return [missing("sst2", "SST-2 main job (examples/sst2.py)", goal, parts)]
    acc, seconds = metrics["fine_tuned"]["accuracy"], part["seconds"]
    measured = (f"accuracy {acc:.4f} in {seconds:.0f} s wall (zero-shot {metrics['zero_shot']['accuracy']:.4f}, "
                f"{metrics['train']['steps']} steps)")
    return [row("sst2", "SST-2 main job (examples/sst2.py)", measured, goal,
                acc >= SST2_ACC and seconds <= SST2_SECONDS, f"device {metrics.get('device', '?')}")]


# ----------------------------------------------------------------------------------------------------------
# the report


def collect(out: Path, dry_run: bool) -> dict:
    parts = read_parts(out)
    rows = (test_rows(out, parts) + dequant_rows(out, parts) + matmul_rows(out, parts) + train_rows(out, parts)
            + sst2_rows(out, parts))
    env = next((d["environment"] for d in map(load_json, (out / "matmul.json", out / "dequant.json")) if d), {})
    summary = {k: sum(r["met"] is v for r in rows) for k, v in (("met", True), ("not_met", False), ("n_a", None))}
    return {"dry_run": dry_run, "environment": env, "parts": list(parts.values()), "summary": summary, "rows": rows}


def markdown(report: dict) -> str:
    env = report["environment"]
    dry = " (DRY RUN: plumbing check on the CPU, the numbers are not the goals)" if report["dry_run"] else ""
    versions = ", ".join(f"{pkg} {env.get(pkg, '?')}" for pkg in ("torch", "triton", "bitsandbytes"))
    count = report["summary"]
    lines = [f"# GPU suite{dry}", "", f"{env.get('device_name', '?')}; {versions}. Goals met: {count['met']}, "
             f"not met: {count['not_met']}, not measured: {count['n_a']}.", "",
             "| part | what | measured | goal | met | note |", "|---|---|---|---|---|---|"]
    met = {True: "yes", False: "**NO**", None: "n/a"}
    for r in report["rows"]:
        lines.append(f"| {r['part']} | {r['what']} | {r['measured']} | {r['goal']} | {met[r['met']]} | {r['note']} |")
    lines += ["", "| part | status | seconds / cap | command |", "|---|---|---|---|"]
    for p in report["parts"]:
        lines.append(f"| {p['part']} | {status(p)} | {p['seconds']:.0f} / {p['cap_s']} | `{' '.join(p['command'])}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the suite's output folder")
    ap.add_argument("--dry-run", action="store_true", help="label the report as a CPU plumbing check")
    args = ap.parse_args()
    report = collect(args.out, args.dry_run)
    atomic_write(args.out / "gpu_suite.json", json.dumps(report, indent=2, default=str))
    text = markdown(report)
    atomic_write(args.out / "gpu_suite.md", text)
    print(text)


if __name__ == "__main__":
    main()
