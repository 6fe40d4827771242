"""Test-wide settings. The suite runs tiny models on a small shared machine, where torch's
intra-op threads cost far more than they save (OpenMP workers waiting on each other), so every
test runs single-threaded. Speed is measured in bench/, never here."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    try:
        import torch
    except ImportError:  # the reader/CLI tests do not need torch
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
