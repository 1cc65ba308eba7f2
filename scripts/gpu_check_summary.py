"""The closing table of ``scripts/gpu-check.sh``: the machine, the test runs' counts (from their
JUnit XML files), the benchmark's rows (from ``benchmarks/step_cuda.py --record``), and a verdict.

    python scripts/gpu_check_summary.py OUT_DIR

OUT_DIR holds what gpu-check.sh left there: ``runs.tsv`` (name, JUnit file, exit status, seconds,
time limit, one line per step), the JUnit files, ``bench.json``. Exits 0 if every step passed.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TIMED_OUT = (124, 137)  # timeout(1): the limit passed; killed after it


def machine() -> list[tuple[str, str]]:
    try:
        import torch
    except ImportError as e:
        return [("torch", f"not importable ({e})")]
    rows = [("torch", f"{torch.__version__} (CUDA {torch.version.cuda})")]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError as e:
        rows.append(("triton", f"not importable ({e})"))
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        rows.insert(0, ("device", f"{torch.cuda.get_device_name()} (sm_{major}{minor}, {total:.0f} GiB)"))
    else:
        rows.insert(0, ("device", "no CUDA device visible to torch"))
    rows.append(("python", sys.executable))
    return rows


def counts(junit: Path) -> dict[str, int] | None:
    """passed / failed / errors / skipped of a JUnit XML file, or None where none was written."""
    if not junit.is_file():
        return None
    try:
        root = ET.parse(junit).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return dict(passed=passed, failed=total["failures"], errors=total["errors"], skipped=total["skipped"])


def main(out: Path) -> int:
    ok = True
    lines = ["", "=" * 100, "qoptim GPU check", "-" * 100]
    lines += [f"{key:8} {value}" for key, value in machine()]
    lines += ["-" * 100, f"{'step':50} {'passed':>6} {'failed':>6} {'errors':>6} {'skipped':>7} {'time':>9}  result"]
    runs = out / "runs.tsv"
    for line in runs.read_text().splitlines() if runs.is_file() else []:
        name, junit, status, seconds, limit = line.split("\t")
        status, found = int(status), counts(out / junit) if junit != "-" else None
        if status in TIMED_OUT:
            result = f"TIMED OUT (limit {limit} s)"
        elif status != 0 or (found is not None and found["failed"] + found["errors"] > 0):
            result = f"FAILED (exit {status})"
        elif junit != "-" and (found is None or found["passed"] == 0):
            result = "FAILED (no test ran: all skipped?)"
        else:
            result = "ok"
        ok = ok and result == "ok"
        numbers = " ".join(f"{found[k]:>{w}}" for k, w in (("passed", 6), ("failed", 6), ("errors", 6), ("skipped", 7))) if found \
            else f"{'-':>6} {'-':>6} {'-':>6} {'-':>7}"  # fmt: skip
        lines.append(f"{name:50} {numbers} {seconds + ' s':>9}  {result}")
    bench = out / "bench.json"
    lines += ["-" * 100, "benchmark (benchmarks/step_cuda.py): median ms of a warm step, and against torch's fused AdamW"]
    rows = json.loads(bench.read_text())["rows"] if bench.is_file() else []
    ok = ok and bool(rows)
    for row in rows:
        figure = f"{row['ms']:9.3f} ms  {row['vs_fused']:6.2f}x" if row["ms"] is not None else f"{'n/a':>12}  {row['note']}"
        lines.append(f"  {row['optimizer']:48} {row['shape']:>10} {row['dtype']:>5} {figure}")
    if not rows:
        lines.append("  (no rows recorded: FAILED)")
    lines += ["-" * 100, f"result: {'PASS' if ok and runs.is_file() else 'FAIL'}", "=" * 100]
    print("\n".join(lines))
    return 0 if ok and runs.is_file() else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
