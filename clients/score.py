"""``he-client score``: encrypt a whole file, score it group by group, write it back scored.

A run records every scored group next to the output (``OUTPUT.progress`` and the group's
outputs under ``OUTPUT.parts/``, each written aside and renamed), so a run that is stopped
loses nothing it scored and a re-run sends only the groups still missing. Keys are made once
and kept beside the output (``OUTPUT.keys``, mode 0600) unless ``--keys`` names a key file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clients._client import HEClient
from clients._errors import DaskClusterError
from clients._outputs import OutOfRangeWarning, Outputs
from clients._pipeline import _dask_module, group_rows_for
from clients._readers import InputFileError, InputFormat, Table, read_table, write_results
from he_service.protocol import PlanKind, Task

__all__ = ["ScoreSummary", "add_parser", "score_file"]

_OUTPUT_SUFFIX = {
    InputFormat.CSV: ".csv",
    InputFormat.IMAGES: ".csv",
    InputFormat.NPY: ".npy",
    InputFormat.PARQUET: ".parquet",
}


@dataclass(frozen=True)
class ScoreSummary:
    """What a run did: rows in the file, rows and groups it scored, what it cost."""

    rows: int
    scored_rows: int
    groups: int
    skipped_groups: int
    seconds: float  # scoring: from the first group's encryption to the last group's answer
    bytes_sent: int
    out_of_range: int
    stages: dict[str, float]
    total_seconds: float = 0.0  # the whole run: reading the file, keys, scoring, writing

    def lines(self) -> list[str]:
        per_row = self.seconds / self.scored_rows * 1000 if self.scored_rows else 0.0
        total = self.total_seconds / self.scored_rows * 1000 if self.scored_rows else 0.0
        skipped = (
            f", {self.skipped_groups} already scored by an earlier run"
            if self.skipped_groups
            else ""
        )
        lines = [
            f"rows: {self.rows} ({self.scored_rows} scored now in "
            f"{self.groups - self.skipped_groups} groups{skipped})",
            f"time: {self.seconds:.1f} s scoring, {per_row:.3f} ms per row; "
            f"{self.total_seconds:.1f} s in all with reading, keys and writing, "
            f"{total:.3f} ms per row",
            f"sent: {self.bytes_sent / 1e6:.1f} MB",
            "stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.stages.items()),
        ]
        if self.out_of_range:
            lines.append(
                f"UNRELIABLE: {self.out_of_range} rows have outputs outside the model's "
                "calibrated ranges"
            )
        return lines


def add_parser(commands: Any) -> None:
    """Add the ``score`` command to ``he-client``'s subcommands."""
    score = commands.add_parser(
        "score", help="score a CSV, Parquet or .npy file, or a folder of images"
    )
    score.add_argument("input", type=Path, help=".csv, .parquet, .npy, or a folder of images")
    score.add_argument("--model", required=True)
    score.add_argument("--output", required=True, type=Path, help="same format as the input")
    score.add_argument("--plan", choices=[k.value for k in PlanKind], default="batch")
    score.add_argument("--keys", type=Path, help="key file to use (default: OUTPUT.keys)")
    score.add_argument("--outputs", action="store_true", help="also write the released outputs")
    score.add_argument("--workers", type=int, help="encrypting processes (default: every core)")
    score.add_argument("--group-rows", type=int, help="rows per group (default: a whole group)")
    score.add_argument(
        "--dask",
        metavar="SCHEDULER",
        help="encrypt and decrypt on this Dask cluster (tcp://HOST:8786 or tls://HOST:8786; "
        "it receives the secret key: use only your own); --workers is then chunks per group",
    )


def run(client: HEClient, args: argparse.Namespace) -> int:
    """Run ``he-client score`` and print its summary.

    A Dask cluster that cannot be used exits with 2 before any key is made or row is read.
    """
    cluster = None
    if args.dask:
        try:
            dask = _dask_module()
            cluster = dask.connect(args.dask)
        except DaskClusterError as exc:
            print(f"he-client: {exc}", file=sys.stderr)
            return 2
        if dask.plain_remote(args.dask):
            print(
                f"he-client: warning: {args.dask} is not encrypted and the secret key goes to "
                "the cluster: use tls:// for a cluster beyond this machine",
                file=sys.stderr,
            )
    try:
        summary = score_file(
            client,
            args.input,
            args.output,
            model=args.model,
            plan=args.plan,
            keys=args.keys,
            with_outputs=args.outputs,
            workers=args.workers,
            group_rows=args.group_rows,
            progress=True,
            dask=cluster,
        )
    finally:
        if cluster is not None:
            cluster.close()
    print("\n".join(summary.lines()))
    return 0


def score_file(
    client: HEClient,
    source: Path,
    output: Path,
    *,
    model: str,
    plan: PlanKind | str = PlanKind.BATCH,
    keys: Path | None = None,
    with_outputs: bool = False,
    workers: int | None = None,
    group_rows: int | None = None,
    progress: bool = False,
    dask: Any = None,
) -> ScoreSummary:
    """Score every row of ``source`` and write it with its class to ``output``.

    Args:
        client: the service.
        source: a .csv, .parquet or .npy file, or a folder of images.
        output: where the scored rows go, in the input's format.
        model, plan: what scores them.
        keys: a key file; by default ``OUTPUT.keys``, made on the first run.
        with_outputs: write the released outputs beside the class.
        workers, group_rows: as ``ModelSession.score_iter``.
        progress: show a progress bar on standard error.
        dask: a Dask scheduler address or ``distributed.Client``: encrypt and decrypt on that
            cluster (an address is connected to before any key is made).

    Raises:
        InputFileError: the input does not fit the model (raised before any encryption), the
            output's suffix is not the input's format, or a record of an earlier run was made
            for another input.
        DaskClusterError: the cluster cannot be reached, or failed (scored groups are kept).
    """
    if isinstance(dask, str):
        cluster = _dask_module().connect(dask)
        try:
            return score_file(
                client,
                source,
                output,
                model=model,
                plan=plan,
                keys=keys,
                with_outputs=with_outputs,
                workers=workers,
                group_rows=group_rows,
                progress=progress,
                dask=cluster,
            )
        finally:
            cluster.close()
    began = time.perf_counter()
    card = client.card(model)
    spec = card.plan(plan)
    table = read_table(source, card.input_shape)
    expected = _OUTPUT_SUFFIX[table.format]
    if output.suffix.lower() != expected:
        raise InputFileError(f"{output}: the output of a {table.format.value} input is {expected}")
    record = _Record(output, table, model, spec.kind)
    key_file = keys or output.with_name(output.name + ".keys")
    if key_file.exists():
        session = client.model(model, plan=spec.kind, keys=key_file)
    else:
        session = client.model(model, plan=spec.kind)
        session.save_keys(key_file)
    done = record.start(min(group_rows or len(table.values), group_rows_for(session)))
    rows = len(table.values)
    start, sent, scored = time.perf_counter(), 0, 0
    with (
        tqdm(
            total=rows, unit="row", disable=not progress, file=sys.stderr, dynamic_ncols=True
        ) as bar,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", OutOfRangeWarning)  # counted in the summary instead
        bar.update(sum(record.rows_of(i) for i in done))
        groups = session.score_iter(
            table.values, group_rows=record.group_rows, workers=workers, skip=done, dask=dask
        )
        for group in groups:
            record.add(group.index, group.outputs)
            sent += group.bytes_sent
            scored += len(group.outputs)
            bar.update(len(group.outputs))
    seconds = time.perf_counter() - start
    outputs, flagged = record.collect()
    classes = np.argmax(outputs, axis=1) if card.task == Task.CLASSIFICATION else None
    write_results(
        output, table, card.labels, classes, outputs if with_outputs or classes is None else None
    )
    record.remove()
    return ScoreSummary(
        rows,
        scored,
        record.groups,
        len(done),
        seconds,
        sent,
        int(np.count_nonzero(flagged)),
        dict(session.last_timings),
        time.perf_counter() - began,
    )


class _Record:
    """The groups a run has scored, kept next to the output so that a re-run skips them."""

    def __init__(self, output: Path, table: Table, model: str, plan: PlanKind) -> None:
        self.progress = output.with_name(output.name + ".progress")
        self.parts = output.with_name(output.name + ".parts")
        self._rows = len(table.values)
        self._identity = {
            "input_sha256": table.fingerprint,
            "rows": self._rows,
            "model": model,
            "plan": plan.value,
        }
        self.group_rows = 0
        self._done: list[int] = []

    @property
    def groups(self) -> int:
        return -(-self._rows // self.group_rows)

    def rows_of(self, index: int) -> int:
        return min(self.group_rows, self._rows - index * self.group_rows)

    def start(self, group_rows: int) -> set[int]:
        """Resume the record of an earlier run of this input, or begin one; returns done groups.

        Raises:
            InputFileError: the record was made for another input, model, plan or group size.
        """
        if not self.progress.exists():
            self.group_rows = group_rows
            self.parts.mkdir(exist_ok=True)
            self._save()
            return set()
        doc = json.loads(self.progress.read_text())
        if doc.get("identity") != self._identity:
            raise InputFileError(
                f"{self.progress} records a run on another input, model or plan; delete it "
                f"and {self.parts} to start over"
            )
        self.group_rows = int(doc["group_rows"])
        self.parts.mkdir(exist_ok=True)
        self._done = sorted(int(i) for i in doc["done"] if (self.parts / f"{int(i)}.npy").exists())
        return set(self._done)

    def add(self, index: int, outputs: Outputs) -> None:
        """Keep one scored group: its outputs first, then the record that names it."""
        buffer = io.BytesIO()
        flagged = np.asarray(outputs.out_of_range, dtype=np.float64).reshape(-1, 1)
        np.save(buffer, np.hstack([np.asarray(outputs), flagged]), allow_pickle=False)
        _write_atomically(self.parts / f"{index}.npy", buffer.getvalue())
        self._done.append(index)
        self._save()

    def collect(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the outputs of every group, in row order, and which rows were flagged."""
        parts = [np.load(self.parts / f"{i}.npy", allow_pickle=False) for i in range(self.groups)]
        whole = np.concatenate(parts)
        return whole[:, :-1], whole[:, -1] != 0

    def remove(self) -> None:
        self.progress.unlink()
        shutil.rmtree(self.parts)

    def _save(self) -> None:
        doc = {"identity": self._identity, "group_rows": self.group_rows, "done": self._done}
        _write_atomically(self.progress, json.dumps(doc).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` aside and rename it over ``path``: a reader sees all of it or none."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
