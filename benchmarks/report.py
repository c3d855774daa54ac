"""Run the benchmarks and print one table: time, size and precision per model and plan.

Usage::

    python benchmarks/report.py                      # run every benchmark, then print
    python benchmarks/report.py --models mnist-cnn   # only these models (and the baseline)
    python benchmarks/report.py --json out.json      # print a saved --benchmark-json file
    python benchmarks/report.py -- -k latency        # extra arguments go to pytest

The run is ``python -m pytest benchmarks --benchmark-only --benchmark-json FILE`` with this
interpreter; the exit status is pytest's, so a failed benchmark or target fails the report.
Ratios compare pipelines measured in the same run; the baseline is TenSEAL's MNIST tutorial
pipeline on mnist-cnn's weights, so only mnist-cnn rows have one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
BASELINE = ("mnist-cnn", "tenseal-tutorial")
PLAN_ORDER = ("tenseal-tutorial", "latency", "batch")
COLUMNS = (
    ("model", "<"),
    ("plan", "<"),
    ("samples", ">"),
    ("server", ">"),
    ("server/sample", ">"),
    ("end-to-end", ">"),
    ("e2e/sample", ">"),
    ("vs baseline", ">"),
    ("context", ">"),
    ("request", ">"),
    ("response", ">"),
    ("max |err|", ">"),
)


def run_benchmarks(json_path: Path, models: Sequence[str], pytest_args: Sequence[str]) -> int:
    """Run the benchmark suite with this interpreter; return pytest's exit status."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(BENCHMARKS),
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        *([f"--bench-models={','.join(models)}"] if models else []),
        *pytest_args,
    ]
    print("$", shlex.join(command), flush=True)
    return subprocess.run(command, cwd=BENCHMARKS.parent, check=False).returncode


def collect(document: dict[str, Any], models: Sequence[str]) -> dict[tuple[str, str], Any]:
    """Group benchmark results by (model, plan): median per stage and merged extra_info."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for bench in document.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "model" not in info or "plan" not in info or "stage" not in info:
            continue
        key = (info["model"], info["plan"])
        if models and key[0] not in models and key != BASELINE:
            continue
        row = rows.setdefault(key, {"stages": {}, "info": {}, "targets": {}})
        row["stages"][info["stage"]] = (float(bench["stats"]["median"]), int(info["samples"]))
        # The server benchmark's sizes describe one request; other stages only fill gaps.
        if info["stage"] == "server":
            row["info"].update(info)
        else:
            for name, value in info.items():
                row["info"].setdefault(name, value)
        row["targets"].update(info.get("targets", {}))
    return rows


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1.0:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} us"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _per_sample(stage: tuple[float, int] | None) -> float | None:
    return None if stage is None else stage[0] / stage[1]


def table_rows(rows: dict[tuple[str, str], Any]) -> list[list[str]]:
    """Return one formatted line of cells per (model, plan), baseline first for its model."""
    baseline = rows.get(BASELINE, {}).get("stages", {}).get("server")
    lines = []
    for model, plan in sorted(
        rows, key=lambda k: (k[0], PLAN_ORDER.index(k[1]) if k[1] in PLAN_ORDER else 99, k[1])
    ):
        row = rows[model, plan]
        stages, info = row["stages"], row["info"]
        server, e2e = stages.get("server"), stages.get("e2e")
        samples = (server or e2e or (0.0, 1))[1]
        ratio = "-"
        if model == BASELINE[0] and baseline is not None and server is not None:
            ratio = f"{(baseline[0] / baseline[1]) / (server[0] / server[1]):.1f}x"
        error = info.get("max_abs_logit_error")
        lines.append(
            [
                model,
                "baseline" if (model, plan) == BASELINE else plan,
                str(samples),
                _seconds(server[0] if server else None),
                _seconds(_per_sample(server)),
                _seconds(e2e[0] if e2e else None),
                _seconds(_per_sample(e2e)),
                ratio,
                _bytes(info.get("public_context_bytes")),
                _bytes(info.get("request_bytes")),
                _bytes(info.get("response_bytes")),
                "-" if error is None else f"{error:.1e}",
            ]
        )
    return lines


def format_table(lines: Iterable[Sequence[str]]) -> str:
    header = [name for name, _ in COLUMNS]
    body = [list(line) for line in lines]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(COLUMNS))]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(cells, COLUMNS, widths, strict=True)
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(cells) for cells in body)])


def format_targets(rows: dict[tuple[str, str], Any]) -> list[str]:
    lines = []
    for row in rows.values():
        for name, target in sorted(row["targets"].items()):
            status = {True: "ok", False: "FAILED", None: "not checked"}[target.get("passed")]
            if "at_least" in target:
                ratio = target.get("ratio")
                value = "-" if ratio is None else f"{ratio:.1f}x"
                lines.append(f"  {name}: {value} (target >= {target['at_least']:g}x) {status}")
            else:
                value = _seconds(target.get("value"))
                goal = _seconds(target.get("at_most"))
                lines.append(f"  {name}: {value} (goal <= {goal}, recorded only) {status}")
    return lines


def report(document: dict[str, Any], models: Sequence[str]) -> str:
    rows = collect(document, models)
    if not rows:
        return "no tagged benchmark results in this file"
    machine = document.get("machine_info", {})
    cpu = machine.get("cpu", {})
    parts = [
        f"Benchmarks of {document.get('datetime', '?')} on {cpu.get('brand_raw', '?')} "
        f"({cpu.get('count', '?')} cores), Python {machine.get('python_version', '?')}; "
        "medians.",
        "",
        format_table(table_rows(rows)),
        "",
        "server: evaluation of one request unit in-process (latency: one sample; batch: one",
        "  full ciphertext group, one sample per slot)",
        "end-to-end: the SDK's predict (latency) or predict_many (batch) over loopback HTTP:",
        "  encrypt, POST, evaluate, decrypt (keys made and uploaded once, before)",
        "vs baseline: baseline server time per sample / this row's, same run (mnist-cnn only)",
        "context: public evaluation keys; request, response: one request's bodies",
        "max |err|: max abs logit error vs forward_plain on held-out samples",
    ]
    targets = format_targets(rows)
    if targets:
        heading = "Targets (ratios of two pipelines in one run; goals are recorded only):"
        parts += ["", heading, *targets]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="print this --benchmark-json file instead of running the benchmarks",
    )
    parser.add_argument(
        "--models",
        default="",
        help="comma-separated models (default: every shipped model; the baseline always runs)",
    )
    parser.add_argument(
        "--save", type=Path, metavar="PATH", help="keep the run's --benchmark-json file here"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]

    if args.json is not None:
        return show(args.json, models, status=0)
    if args.save is not None:
        return show(args.save, models, run_benchmarks(args.save, models, args.pytest_args))
    with tempfile.TemporaryDirectory(prefix="he-bench-") as tmp:
        json_path = Path(tmp) / "benchmarks.json"
        return show(json_path, models, run_benchmarks(json_path, models, args.pytest_args))


def show(json_path: Path, models: Sequence[str], status: int) -> int:
    """Print the table of a --benchmark-json file; return the exit status of the report."""
    try:
        document = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read benchmark results {json_path}: {exc}", file=sys.stderr)
        return status or 1
    print()
    print(report(document, models))
    if status != 0:
        print(f"\nthe benchmark run failed (pytest exit status {status})", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
