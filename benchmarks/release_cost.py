"""Measure what safe decryption costs in precision: raw vs released outputs, same ciphertexts.

For each ``MODEL:PLAN:SAMPLES``, held-out samples of the model's recipe are encrypted by the
SDK and evaluated by an in-process app; the answers are decrypted twice, raw (what the SDK no
longer returns) and through ``clients._release.release``, and both are compared with the
plaintext polynomial network. The last columns show what OpenFHE's provable
``NOISE_FLOODING_DECRYPT`` (s = 30 bits, one adversarial query) would add: Gaussian noise of
``sqrt(12) 2^15`` times the measured noise, and the argmax agreement left after it.

    python benchmarks/release_cost.py mnist-cnn:latency:100 mnist-cnn:batch:1000
"""

from __future__ import annotations

import math
import sys

import httpx
import numpy as np

from clients import HEClient
from clients._release import FLOOD_FACTOR, noise_spread, release
from he_service import create_app
from he_service.artifacts import load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import forward_plain
from he_service.protocol import preprocess

PROVABLE = math.sqrt(12) * 2**15


def measure(client: HEClient, name: str, plan: str, count: int) -> str:
    """Return one line of figures for ``count`` held-out samples of one plan of a model."""
    from models.recipes import RECIPES

    artifact = load_artifact(DEFAULT_MODELS_DIR / name)
    seed = int(artifact.manifest.get("training", {}).get("split_seed", 0))
    raw_x = RECIPES[name].load_split(seed).x_test[:count]
    prepared = np.stack(
        [preprocess(x, artifact.preprocessing, artifact.input_shape) for x in raw_x]
    )
    plain = np.stack([forward_plain(artifact, x) for x in prepared])
    session = client.model(name, plan=plan)
    spec = session.spec
    raws, released, spreads = [], [], []
    left = len(prepared)
    for vectors in spec.input_encoding.units(prepared):
        samples = min(spec.samples_per_unit, left)
        left -= samples
        ciphertexts = [session.keys.encrypt(v) for v in vectors]
        outputs, _ = client.predict_raw(name, session.context_id, ciphertexts, plan=plan)
        slots = [session.keys._decrypt_slots(ct) for ct in outputs]
        raws.append(spec.output_decoding.decode([s.real for s in slots], samples))
        spreads += [noise_spread(s) for s in slots]
        released.append(
            release(session.keys, outputs, spec.output_decoding, samples, spec.output_precision)
        )
    raw, out = np.concatenate(raws), np.concatenate(released)
    noise = float(np.median(spreads))
    flooded = plain + np.random.default_rng(0).normal(0.0, PROVABLE * noise, plain.shape)

    def agreement(values: np.ndarray) -> float:
        return float(np.mean(values.argmax(axis=1) == plain.argmax(axis=1)))

    return (
        f"| {name} {plan} | {count} | {spec.output_precision:g} | {noise:.2g} | "
        f"{FLOOD_FACTOR * noise:.2g} | {np.abs(raw - plain).max():.3g} | "
        f"{np.abs(out - plain).max():.3g} | {np.abs(out - plain).mean():.3g} | "
        f"{agreement(raw):.4f} | {agreement(out):.4f} | {PROVABLE * noise:.3g} | "
        f"{agreement(flooded):.4f} |"
    )


def main(argv: list[str]) -> int:
    """Print a Markdown table, one row per ``MODEL:PLAN:SAMPLES`` argument."""
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print(
        "| model, plan | samples | output precision | noise sd | flooding sd | raw max err "
        "| released max err | released mean err | raw agreement | released agreement "
        "| provable flooding sd | its agreement |"
    )
    print("|---" * 12 + "|")
    app = create_app({"key_store_max_bytes": 1 << 30})
    with HEClient("http://testserver", transport=httpx.WSGITransport(app=app)) as client:
        for arg in argv:
            name, plan, count = arg.split(":")
            print(measure(client, name, plan, int(count)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
