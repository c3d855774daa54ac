"""Fixtures shared by the engine's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from he_service.protocol.params import CkksParams

from .batch_keys import Keys


@pytest.fixture(scope="module")
def keys() -> Iterator[Callable[[CkksParams], Keys]]:
    """Key sets by parameters, generated once per module."""
    cache: dict[CkksParams, Keys] = {}

    def get(params: CkksParams) -> Keys:
        if params not in cache:
            cache[params] = Keys(params)
        return cache[params]

    yield get
    cache.clear()
