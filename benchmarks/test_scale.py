"""How cost grows with the network: one row per network of the scale series.

``python -m pytest benchmarks/test_scale.py --benchmark-only`` (or ``python
benchmarks/report.py --scale --plot docs/scale.png``). Networks are trained on first use and
cached (``--scale-cache``); ``--scale-networks`` picks some, ``--scale-samples`` sets the
held-out samples run encrypted, ``--scale-rounds`` the timed evaluations. Setup (training,
compiling, key generation, encryption, the correctness run) stays out of the timed part: only
``EncryptedEvaluator.evaluate`` of one sample is timed.

A network the engine or the converter refuses is a row with the reason (the test is skipped);
a served network must evaluate every sample and keep its encrypted argmax on the plaintext
polynomial network's for at least ``AGREEMENT`` of them.
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from scale_series import ScaleRun, artifact_for, compile_row, measure, not_converted

from models import ConversionError
from tests.networks.zoo import NetworkSpec

AGREEMENT = 0.99  # encrypted vs plaintext argmax, per served network (issue 10)


def test_scale(benchmark: BenchmarkFixture, scale: ScaleRun, network: NetworkSpec) -> None:
    try:
        artifact = artifact_for(network, scale.cache)
    except ConversionError as exc:
        scale.rows.append(not_converted(network, str(exc)))
        pytest.skip(f"{network.name} is not converted: {exc}")
    row, compiled = compile_row(network, artifact)
    scale.rows.append(row)
    if compiled is None:
        pytest.skip(f"{network.name} is refused: {row.reason}")
    measured = measure(row, compiled, scale.samples)  # records a failed evaluation, re-raises
    benchmark.extra_info["scale_network"] = network.name
    benchmark.pedantic(measured.evaluate, rounds=scale.rounds, iterations=1)
    assert benchmark.stats is not None
    row.server_seconds = float(benchmark.stats.stats.median)
    benchmark.extra_info.update(row.to_json())
    if row.agreement is not None:
        assert row.agreement >= AGREEMENT, (
            f"{network.name}: encrypted argmax agrees with the plaintext network on "
            f"{row.agreement:.1%} of {row.samples} samples; at least {AGREEMENT:.0%} expected"
        )
