"""Fixtures shared by the unit tests of several areas."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one thread: tiny models and decoding steps gain nothing from a second thread,
    and on a small shared CPU the second one costs far more than it saves. Request it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
