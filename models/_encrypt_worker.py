"""Worker process of ``models.evaluation.encrypted_outputs``: one chunk of samples.

Run by path with ``python -P`` (so that this directory is not put on ``sys.path``), never
imported: ``python -P _encrypt_worker.py ARTIFACT_DIR SAMPLES.npy OUT.npy SEED``. It imports
neither torch nor ``models``, reads and writes ``.npy`` files without pickle, and compiles the
plan itself, so nothing but file names crosses the process boundary.
"""

from __future__ import annotations

import sys

import numpy as np

from he_service.artifacts import load_artifact
from he_service.engine import compile_plan
from he_service.engine.selfcheck import encrypted_outputs


def main(argv: list[str]) -> int:
    """Encrypt, evaluate and decrypt the samples; write the outputs.

    Args:
        argv: artifact directory, samples file, output file, seed.

    Returns:
        The exit code.
    """
    artifact_dir, samples_path, out_path, seed = argv
    plan = compile_plan(load_artifact(artifact_dir))
    samples = np.load(samples_path, allow_pickle=False)
    outputs = encrypted_outputs(plan, list(samples), seed=int(seed))
    np.save(out_path, outputs, allow_pickle=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
