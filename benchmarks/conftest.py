"""Benchmark fixtures: the service under waitress on loopback, keys per model and plan, data.

Modules run in the order baseline -> latency -> batch, so that the reference of every
same-run speed ratio is measured first (see ``harness.Measurements``). ``--bench-models``
limits the models; the baseline always runs (it is the reference of mnist-cnn's targets).

The scale series (``test_scale.py``, ``--scale-*`` options) trains networks and takes long:
it runs only when named on the command line, and its rows (refusals included) go to the
``--benchmark-json`` document under ``"scale"``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask
from harness import HeldOut, Measurements, Served, Sessions, shipped_models
from waitress.server import create_server

from clients import HEClient
from he_service.app import create_app

if TYPE_CHECKING:
    from scale_series import ScaleRun

_MODULE_ORDER = ("test_baseline_tenseal.py", "test_latency.py", "test_batch.py")
_HERE = Path(__file__).resolve().parent
_SCALE = _HERE / "test_scale.py"
_SCALE_RUN = pytest.StashKey["ScaleRun"]()
# The scale series builds its networks with the test zoo (tests/networks), wherever pytest runs.
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-models",
        default="",
        help="comma-separated models to benchmark (default: every shipped model)",
    )
    group = parser.getgroup("scale", "scale series (benchmarks/test_scale.py)")
    group.addoption(
        "--scale-networks",
        default="",
        help="comma-separated networks of the scale series (default: all)",
    )
    group.addoption(
        "--scale-samples",
        type=int,
        default=32,
        help="held-out samples per network run encrypted for error and agreement (32)",
    )
    group.addoption("--scale-rounds", type=int, default=3, help="timed evaluations per network (3)")
    group.addoption(
        "--scale-cache",
        type=Path,
        default=_HERE.parent / ".benchmarks" / "scale-networks",
        help="where trained networks are cached (default .benchmarks/scale-networks)",
    )


def pytest_configure(config: pytest.Config) -> None:
    import os
    import tempfile

    # Benchmark keys are thrown away: keep them off the user's durable key store.
    os.environ["HE_SERVICE_KEY_STORE_DIR"] = tempfile.mkdtemp(prefix="he-bench-contexts-")
    models = shipped_models()
    unknown = sorted(set(_chosen(config)) - set(models))
    if unknown:
        raise pytest.UsageError(f"--bench-models: unknown models {unknown}; shipped: {models}")


def _chosen(config: pytest.Config) -> list[str]:
    return [m for m in str(config.getoption("--bench-models")).split(",") if m]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize benchmarks over the selected shipped models or scale-series networks."""
    if "model" in metafunc.fixturenames:
        models = _chosen(metafunc.config) or shipped_models()
        if metafunc.module.__name__.endswith("test_batch") and not _chosen(metafunc.config):
            # A group that needs more than one request body (LeNet-5: 588 MiB, several GB of
            # server memory, minutes per group) is measured only when named: --bench-models.
            models = [m for m in models if _batch_request_bytes(m) <= BATCH_BODY_BYTES]
        metafunc.parametrize("model", models)
    if "network" in metafunc.fixturenames:
        from scale_series import SERIES

        chosen = [n for n in str(metafunc.config.getoption("--scale-networks")).split(",") if n]
        known = [spec.name for spec in SERIES]
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise pytest.UsageError(f"--scale-networks: unknown {unknown}; known: {known}")
        specs = [spec for spec in SERIES if not chosen or spec.name in chosen]
        metafunc.parametrize("network", specs, ids=[spec.name for spec in specs])


BATCH_BODY_BYTES = 512 << 20


def _batch_request_bytes(model: str) -> int:
    from he_service.artifacts import load_artifact
    from he_service.config import DEFAULT_MODELS_DIR
    from he_service.engine import compile_batch_plan

    plan = compile_batch_plan(load_artifact(DEFAULT_MODELS_DIR / model))
    return plan.costs()["request_bytes_per_group"]


def _named_on_command_line(config: pytest.Config, path: Path) -> bool:
    for arg in config.args:
        target = Path(str(arg).split("::")[0])
        target = target if target.is_absolute() else Path(config.invocation_params.dir) / target
        if target.resolve() == path:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the scale series unless named; run baseline, then latency, then batch."""
    if not _named_on_command_line(config, _SCALE):
        skipped = [item for item in items if item.path == _SCALE]
        if skipped:
            config.hook.pytest_deselected(items=skipped)
            items[:] = [item for item in items if item.path != _SCALE]
    positions = [i for i, item in enumerate(items) if item.path.parent == _HERE]

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _MODULE_ORDER.index(name) if name in _MODULE_ORDER else len(_MODULE_ORDER)

    ordered = sorted((items[i] for i in positions), key=rank)
    for position, item in zip(positions, ordered, strict=True):
        items[position] = item


@pytest.fixture(scope="session")
def app() -> Flask:
    return create_app()


@pytest.fixture(scope="session")
def server_url(app: Flask) -> Iterator[str]:
    """Serve the app with the production WSGI server on 127.0.0.1, in a background thread."""
    # A batch request for one group of MNIST images is about 150 MB.
    server = create_server(app, host="127.0.0.1", port=0, threads=2, max_request_body_size=1 << 30)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()


@pytest.fixture(scope="session")
def client(server_url: str) -> Iterator[HEClient]:
    with HEClient(server_url, timeout=600.0) as he_client:
        yield he_client


@pytest.fixture(scope="session")
def served(app: Flask) -> Served:
    return Served(app)


@pytest.fixture(scope="session")
def sessions(client: HEClient, served: Served) -> Sessions:
    return Sessions(client, served)


@pytest.fixture(scope="session")
def heldout(served: Served) -> HeldOut:
    return HeldOut(served)


@pytest.fixture(scope="session")
def measurements() -> Measurements:
    return Measurements()


@pytest.fixture(scope="session")
def scale(request: pytest.FixtureRequest) -> ScaleRun:
    from scale_series import ScaleRun  # torch: only when the scale series runs

    config = request.config
    run = ScaleRun(
        cache=Path(config.getoption("--scale-cache")),
        samples=int(config.getoption("--scale-samples")),
        rounds=int(config.getoption("--scale-rounds")),
    )
    config.stash[_SCALE_RUN] = run
    return run


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list[object], output_json: dict[str, Any]
) -> None:
    """Add the scale series' rows (refusals included) to the --benchmark-json document."""
    run = config.stash.get(_SCALE_RUN, None)
    if run is not None:
        output_json["scale"] = [row.to_json() for row in run.rows]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    run = config.stash.get(_SCALE_RUN, None)
    if run is not None and run.rows:
        from report import scale_report

        terminalreporter.write_sep("-", "scale series")
        terminalreporter.write_line(scale_report([row.to_json() for row in run.rows]))
