"""Measure memory under two loads: a key-section inflation attack, and one batch request.

``attack``: POST /v1/contexts with a relin_keys section of about 128 MiB (the context limit)
that zstd-inflates just under 8x, in-process (Flask test client). Reports the peak RSS growth
and the peak of shared memory (``Shmem`` in /proc/meminfo: /dev/shm files and memfd scratch
alike) during the request, sampled every 20 ms.

``batch MODEL``: one full batch group of MODEL: the server's memory estimate for the request
(``ServedPlan.request_memory_bytes``) against the measured peak RSS growth during it.

    python benchmarks/memory_faults.py attack
    python benchmarks/memory_faults.py batch mnist-cnn
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) << 10


def _shmem() -> int:
    with open("/proc/meminfo") as info:
        return next(int(line.split()[1]) for line in info if line.startswith("Shmem:")) << 10


def _peaks(work: Callable[[], Any]) -> tuple[Any, int, int, float]:
    """Run ``work``; return its result, peak RSS and Shmem growth, and seconds."""
    rss0, shm0 = _rss(), _shmem()
    peak = [rss0, shm0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0], peak[1] = max(peak[0], _rss()), max(peak[1], _shmem())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return result, peak[0] - rss0, peak[1] - shm0, time.perf_counter() - start


def _bomb_section(compressed_target: int) -> bytes:
    """A SEAL-headed zstd section of about ``compressed_target`` bytes inflating about 7.9x."""
    block = 1 << 20
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    pieces = []
    size = 0
    while size < compressed_target:
        piece = compressor.compress(os.urandom(block) + bytes(int(6.9 * block)))
        pieces.append(piece)
        size += len(piece)
    pieces.append(compressor.flush())
    frame = b"".join(pieces)
    header = (0xA15E).to_bytes(2, "little") + bytes([16, 4, 0, 2]) + bytes(2)
    return header + (16 + len(frame)).to_bytes(8, "little") + frame


def attack() -> None:
    from he_service import create_app
    from he_service.config import DEFAULT_MODELS_DIR
    from he_service.protocol import CkksParams, KeyBundle, encode_key_bundle

    root = Path(tempfile.mkdtemp())
    shutil.copytree(DEFAULT_MODELS_DIR / "mnist-cnn", root / "mnist-cnn")
    app = create_app({"models_dir": root, "key_store_dir": root / "contexts"})
    card = app.test_client().get("/v1/models/mnist-cnn").get_json()
    params = CkksParams.from_json(card["plans"]["latency"]["ckks"])
    section = _bomb_section((128 << 20) - (1 << 20))
    bundle = encode_key_bundle(KeyBundle(params, (), {"relin_keys": section}))
    print(f"bundle {len(bundle) >> 20} MiB, section inflates to about {7.9 * len(section):.3g} B")
    client = app.test_client()
    answer, rss, shm, seconds = _peaks(lambda: client.post("/v1/contexts", data=bundle))
    print(f"status {answer.status_code}: {answer.get_json()['error']['message'][:160]}")
    print(f"peak RSS growth {rss / 2**20:.0f} MiB, peak Shmem growth {shm / 2**20:.0f} MiB, ")
    print(f"{seconds:.1f} s (the request body itself is {len(bundle) / 2**20:.0f} MiB)")


def batch(model: str) -> None:
    import numpy as np

    from he_service import create_app
    from he_service.config import DEFAULT_MODELS_DIR
    from he_service.protocol import encode_frames, preprocess

    root = Path(tempfile.mkdtemp())
    shutil.copytree(DEFAULT_MODELS_DIR / model, root / model)
    app = create_app({"models_dir": root, "key_store_dir": root / "contexts"})
    service = app.extensions["he_service"]
    plan = service.registry.model(model).plan("batch")
    from clients import KeySet

    keys = KeySet.generate(plan.params, ())
    context = app.test_client().post("/v1/contexts", data=keys.public_context).get_json()
    card = service.registry.model(model).card
    sample = preprocess(np.zeros(card.input_shape), card.preprocessing, card.input_shape)
    (vectors,) = plan.card().input_encoding.units(sample[None])
    body = encode_frames([keys.encrypt(v) for v in vectors])
    estimate = plan.request_memory_bytes(plan.inputs_per_unit)
    headers = {"X-Context-Id": context["context_id"]}
    client = app.test_client()
    url = f"/v1/models/{model}/predict?plan=batch"
    for run in ("first", "second"):  # the second reuses SEAL's pool: what a warm worker pays
        answer, rss, _, seconds = _peaks(lambda: client.post(url, data=body, headers=headers))
        print(
            f"{model} batch, one group ({plan.inputs_per_unit} ciphertexts, body "
            f"{len(body) / 2**20:.0f} MiB), {run} request: status {answer.status_code}, "
            f"estimate {estimate / 2**20:.0f} MiB, measured peak RSS growth "
            f"{rss / 2**20:.0f} MiB, {seconds:.1f} s"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["attack"]:
        attack()
    elif sys.argv[1:2] == ["batch"] and len(sys.argv) == 3:
        batch(sys.argv[2])
    else:
        raise SystemExit(__doc__)
