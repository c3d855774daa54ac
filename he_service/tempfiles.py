"""Temporary files of the disk stores, named after their writer so a sweep can tell orphans.

A write goes to ``.tmp-<pid>-<random>`` in the target folder and is renamed into place; a
process killed mid-write leaves its file behind, and any later process may remove it once no
process of that id is alive.
"""

from __future__ import annotations

import os

__all__ = ["TMP_PREFIX", "tmp_prefix", "writer_is_dead"]

TMP_PREFIX = ".tmp-"


def tmp_prefix() -> str:
    """Return the prefix of this process's temporary files (for ``tempfile.mkstemp``)."""
    return f"{TMP_PREFIX}{os.getpid()}-"


def writer_is_dead(name: str) -> bool:
    """Return whether the temporary file ``name`` (``.tmp-<pid>-...``) belongs to no process.

    Names without a pid (older versions) are never called dead here: age-based sweeps remove
    them.
    """
    pid_text = name[len(TMP_PREFIX) :].split("-", 1)[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
