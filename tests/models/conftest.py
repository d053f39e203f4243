"""Trainer tests run their tiny models on one CPU thread: with threads contending for 2 cores, torch's
intra-op pool makes small ops many times slower, not faster."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
