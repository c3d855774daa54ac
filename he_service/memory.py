"""The process memory budget: what requests may hold at once, reserved before work starts.

Decoding a body (a context's keys, a request's ciphertexts) and evaluating a request take
memory in proportion to what the client sent and to the plan's parameters. Each such piece of
work first reserves its estimate (``ServedPlan.request_memory_bytes``, the key bundle's size
bounds) from one ``MemoryBudget`` shared by every thread of the process; what does not fit
next to the work in flight is refused at once: 503 with ``Retry-After`` when it would fit
later, 413 naming the limit when it never could. So the process never holds a multiple of a
body per thread, and SEAL never reaches ``std::bad_alloc`` on a well-sized host.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MemoryBudget", "MemoryBusy", "MemoryLimitExceeded", "default_budget_bytes"]

# Of the memory the process may use (RAM, or a cgroup's limit): the rest is for the compiled
# plans, the key cache, Python and the allocator's slack.
_DEFAULT_SHARE = 0.5
_FALLBACK_BYTES = 4 << 30


class MemoryBusy(Exception):
    """The work would fit the budget, but not next to the work in flight now; retry later."""

    def __init__(self, what: str, needed: int, free: int, retry_after: int) -> None:
        super().__init__(
            f"the server is busy: {what} needs about {needed} bytes of memory and {free} are "
            f"free now; retry in {retry_after} s"
        )
        self.retry_after = retry_after


class MemoryLimitExceeded(Exception):
    """The work needs more memory than the whole budget: it can never run here."""

    def __init__(self, what: str, needed: int, limit: int) -> None:
        super().__init__(
            f"{what} needs about {needed} bytes of memory, more than this server's budget of "
            f"{limit} bytes (memory_budget_bytes); send fewer samples per request"
        )
        self.what, self.needed, self.limit = what, needed, limit


class MemoryBudget:
    """A byte budget shared by the threads of one process (a non-blocking byte semaphore).

    Args:
        capacity: bytes that work in flight may hold at once.
        retry_after: seconds a refused caller is told to wait.
    """

    def __init__(self, capacity: int, *, retry_after: int = 2) -> None:
        if capacity <= 0:
            raise ValueError(f"a memory budget must be positive, got {capacity}")
        self.capacity, self.retry_after = capacity, retry_after
        self._used = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryBudget(capacity={self.capacity}, in_use={self.in_use})"

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._used

    def claim(self, nbytes: int) -> bool:
        """Hold ``nbytes`` for the life of the process (a served model) if they fit now."""
        with self._lock:
            if self._used + nbytes > self.capacity:
                return False
            self._used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back what ``claim`` held (a model that failed to load after all)."""
        with self._lock:
            self._used -= nbytes

    @property
    def free(self) -> int:
        with self._lock:
            return self.capacity - self._used

    def check(self, nbytes: int, what: str) -> None:
        """Refuse work that could never fit the budget.

        Raises:
            MemoryLimitExceeded: ``nbytes`` exceeds the capacity.
        """
        if nbytes > self.capacity:
            raise MemoryLimitExceeded(what, nbytes, self.capacity)

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the duration of the block.

        Raises:
            MemoryLimitExceeded: more than the whole budget (413).
            MemoryBusy: not available next to the work in flight (503, retry).
        """
        nbytes = max(0, int(nbytes))
        self.check(nbytes, what)
        with self._lock:
            free = self.capacity - self._used
            if nbytes > free:
                raise MemoryBusy(what, nbytes, free, self.retry_after)
            self._used += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._used -= nbytes


def default_budget_bytes() -> int:
    """Return half the memory this process may use: the host's RAM or its cgroup's limit."""
    limits = []
    with contextlib.suppress(ValueError, OSError, AttributeError):
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(path).read_text().strip()
            if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
                limits.append(int(text))
    usable = min((v for v in limits if v > 0), default=_FALLBACK_BYTES)
    return int(usable * _DEFAULT_SHARE)
