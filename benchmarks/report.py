"""Run the benchmarks and print one table: time, size and precision per model and plan.

Usage::

    python benchmarks/report.py                      # run every benchmark, then print
    python benchmarks/report.py --models mnist-cnn   # only these models (and the baseline)
    python benchmarks/report.py --json out.json      # print a saved --benchmark-json file
    python benchmarks/report.py -- -k latency        # extra arguments go to pytest
    python benchmarks/report.py --scale --plot docs/scale.png   # the scale series instead
    python benchmarks/report.py --scale --json out.json --markdown  # its table for README

``--scale`` runs ``benchmarks/test_scale.py`` (networks of growing width and depth, trained
and cached on first use) and prints one row per network, refusals included; ``--plot PATH``
writes key bytes and server time against the number of weights as a PNG.

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


def run_benchmarks(
    json_path: Path, models: Sequence[str], pytest_args: Sequence[str], *, scale: bool = False
) -> int:
    """Run the benchmarks (or the scale series) with this interpreter; return pytest's status."""
    if scale:
        selection = [
            str(BENCHMARKS / "test_scale.py"),
            *([f"--scale-networks={','.join(models)}"] if models else []),
        ]
    else:
        selection = [str(BENCHMARKS), *([f"--bench-models={','.join(models)}"] if models else [])]
    command = [
        sys.executable,
        "-m",
        "pytest",
        *selection,
        "--benchmark-only",
        f"--benchmark-json={json_path}",
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
    parser.add_argument(
        "--scale",
        action="store_true",
        help="the scale series (benchmarks/test_scale.py) instead of the shipped models",
    )
    parser.add_argument(
        "--networks",
        default="",
        help="with --scale: comma-separated networks of the series (default: all)",
    )
    parser.add_argument(
        "--plot", type=Path, metavar="PATH", help="with --scale: write the scale plot (PNG) here"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="with --scale: print the table as Markdown"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if not args.scale and (args.plot or args.markdown or args.networks):
        parser.error("--plot, --markdown and --networks need --scale")
    selected = args.networks if args.scale else args.models
    models = [m for m in selected.split(",") if m]

    def present(path: Path, status: int) -> int:
        if args.scale:
            return show_scale(path, status, plot=args.plot, markdown=args.markdown)
        return show(path, models, status)

    if args.json is not None:
        return present(args.json, 0)
    if args.save is not None:
        return present(
            args.save, run_benchmarks(args.save, models, args.pytest_args, scale=args.scale)
        )
    with tempfile.TemporaryDirectory(prefix="he-bench-") as tmp:
        json_path = Path(tmp) / "benchmarks.json"
        status = run_benchmarks(json_path, models, args.pytest_args, scale=args.scale)
        return present(json_path, status)


def _read(json_path: Path) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read benchmark results {json_path}: {exc}", file=sys.stderr)
        return None
    return document


def show(json_path: Path, models: Sequence[str], status: int) -> int:
    """Print the table of a --benchmark-json file; return the exit status of the report."""
    document = _read(json_path)
    if document is None:
        return status or 1
    print()
    print(report(document, models))
    if status != 0:
        print(f"\nthe benchmark run failed (pytest exit status {status})", file=sys.stderr)
    return status


# The scale series: one row per network (``scale_series.Row`` as JSON), refusals included.
SCALE_COLUMNS = (
    ("network", "<"),
    ("weights", ">"),
    ("depth", ">"),
    ("N", ">"),
    ("primes", ">"),
    ("rotations", ">"),
    ("Galois keys", ">"),
    ("public keys", ">"),
    ("request", ">"),
    ("server", ">"),
    ("max abs error", ">"),
    ("agreement", ">"),
    ("status", "<"),
    ("expected error", ">"),  # shown once plans publish their expected logit error
)
SCALE_NOTES = (
    "weights: of the converted network (BatchNorm folded); depth: activation levels;",
    "  primes: data primes of the coefficient modulus (the special prime not counted)",
    "public keys: relinearization + Galois keys as the SDK uploads them; request: one sample;",
    "  ~ marks a refused network's plan figures without the key budget",
    "server: median of the timed evaluations of one sample (EncryptedEvaluator, in-process)",
    "max abs error, agreement: encrypted vs forward_plain on held-out samples (argmax);",
    "  expected error: what the plan publishes (when it does)",
)


def _one_line(text: str, limit: int = 240) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _short_reason(row: dict[str, Any]) -> str:
    reason = str(row.get("reason", ""))
    if row["status"] == "refused" and "key budget" in reason:
        return "refused: keys over budget"
    if "residual" in reason or "skip connection" in reason:
        return f"{row['status']}: residual"
    first = reason.split(";")[0].split(":")[-1].strip()
    return f"{row['status']}: {first[:40]}" if reason else str(row["status"])


def scale_cells(row: dict[str, Any]) -> list[str]:
    """Return the formatted cells of one network of the scale series."""
    estimated = "~" if row.get("estimated") else ""
    bits = row.get("coeff_modulus_bits")
    error, agreement = row.get("max_abs_error"), row.get("agreement")
    expected = row.get("expected_max_logit_error")

    def count(name: str) -> str:
        value = row.get(name)
        return "-" if value is None else str(value)

    def size(name: str) -> str:
        value = row.get(name)
        return "-" if value is None else estimated + _bytes(int(value))

    return [
        row["name"],
        f"{row['parameters']:,}",
        count("depth"),
        count("poly_modulus_degree"),
        "-" if not bits else str(len(bits) - 1),
        count("rotations"),
        count("galois_keys"),
        size("public_key_bytes"),
        size("request_bytes"),
        _seconds(row.get("server_seconds")),
        "-" if error is None else f"{error:.1e}",
        "-" if agreement is None else f"{agreement:.0%} of {row['samples']}",
        _short_reason(row),
        "-" if expected is None else f"{expected:.1e}",
    ]


def scale_report(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """Return the scale series as a table (text or Markdown), notes and refusal reasons."""
    columns = list(SCALE_COLUMNS)
    body = [scale_cells(row) for row in rows]
    if all(row.get("expected_max_logit_error") is None for row in rows):
        columns.pop()
        body = [cells[:-1] for cells in body]
    header = [name for name, _ in columns]
    if markdown:
        align = ["---" if a == "<" else "--:" for _, a in columns]
        lines = [header, align, *body]
        table = "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    else:
        widths = [max(len(c[i]) for c in [header, *body]) for i in range(len(header))]
        table = "\n".join(
            "  ".join(
                f"{cell:{align}{width}}"
                for cell, (_, align), width in zip(cells, columns, widths, strict=True)
            ).rstrip()
            for cells in [header, ["-" * w for w in widths], *body]
        )
    bullet = "- " if markdown else "  "
    reasons = [
        f"{bullet}{row['name']}: {_one_line(str(row['reason']))}"
        for row in rows
        if row.get("reason")
    ]
    parts = [table]
    if not markdown:
        parts += ["", *SCALE_NOTES]
    if reasons:
        parts += ["", "Not served:", *reasons]
    return "\n".join(parts)


def plot_scale(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write key bytes and server time against the number of weights (log scales) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"mlp": "o", "cnn": "s", "residual": "^"}
    colours = {"mlp": "tab:blue", "cnn": "tab:orange", "residual": "tab:green"}
    figure, (keys_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for row in rows:
        family = str(row.get("family", "mlp"))
        style = {
            "marker": markers.get(family, "o"),
            "color": colours.get(family, "tab:gray"),
            "markersize": 7,
        }
        served = row["status"] == "served"
        if row.get("public_key_bytes") is not None:
            keys_ax.plot(
                row["parameters"],
                row["public_key_bytes"] / 1e6,
                linestyle="none",
                markerfacecolor=style["color"] if served else "none",
                **style,
            )
            keys_ax.annotate(
                row["name"], (row["parameters"], row["public_key_bytes"] / 1e6), fontsize=6,
                xytext=(3, 3), textcoords="offset points",
            )  # fmt: skip
        if served and row.get("server_seconds") is not None:
            time_ax.plot(row["parameters"], row["server_seconds"] * 1e3, linestyle="none", **style)
            time_ax.annotate(
                row["name"], (row["parameters"], row["server_seconds"] * 1e3), fontsize=6,
                xytext=(3, 3), textcoords="offset points",
            )  # fmt: skip
    budgets = {row["key_budget_bytes"] for row in rows if row.get("key_budget_bytes")}
    for budget in sorted(budgets):
        keys_ax.axhline(budget / 1e6, color="tab:red", linestyle="--", linewidth=1)
        keys_ax.annotate(
            f"key budget {budget / 2**20:.0f} MiB", (0.99, budget / 1e6), fontsize=7,
            color="tab:red", xycoords=("axes fraction", "data"), xytext=(0, -9),
            textcoords="offset points", horizontalalignment="right",
        )  # fmt: skip
    for ax, label in ((keys_ax, "public keys (MB)"), (time_ax, "server time per sample (ms)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("weights of the converted network")
        ax.set_ylabel(label)
        ax.grid(True, which="both", linewidth=0.3)
    keys_ax.set_title("Public keys (hollow: not served; refused: the plan's figure)", fontsize=10)
    time_ax.set_title("Server evaluation of one sample (served networks)", fontsize=10)
    handles = [
        plt.Line2D([], [], marker=markers[f], color=colours[f], linestyle="none", label=f)
        for f in markers
    ]
    time_ax.legend(handles=handles, fontsize=8, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def show_scale(json_path: Path, status: int, *, plot: Path | None, markdown: bool) -> int:
    """Print the scale series of a --benchmark-json file (and plot it); return the status."""
    document = _read(json_path)
    if document is None:
        return status or 1
    rows = document.get("scale", [])
    if not rows:
        print("no scale series in this file (run with --scale)", file=sys.stderr)
        return status or 1
    print()
    print(scale_report(rows, markdown=markdown))
    if plot is not None:
        plot_scale(rows, plot)
        print(f"\nplot written to {plot}")
    if status != 0:
        print(f"\nthe benchmark run failed (pytest exit status {status})", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
