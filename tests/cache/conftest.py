"""Module-scoped origins for the cache tests through `kanal run`: each test module gets
its own backend thread, an `origin`, and a `fragile` origin that a test may stop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cache.origin import Origin, start_origin
from tests.conftest import BackendThread


@pytest.fixture(scope="module")
def pool() -> Iterator[BackendThread]:
    threads = BackendThread()
    yield threads
    threads.close()


@pytest.fixture(scope="module")
def origin(pool: BackendThread) -> Origin:
    return start_origin(pool)


@pytest.fixture(scope="module")
def fragile(pool: BackendThread) -> Origin:
    """An origin a test stops."""
    return start_origin(pool)
