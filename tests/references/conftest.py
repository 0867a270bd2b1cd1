"""Every reference test runs single-threaded (see the fixture)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The references' tensors are tiny: on a shared 2-core box OpenMP spinning makes them 100x slower
    with 2 threads than with 1. Applied to every test in this folder."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
