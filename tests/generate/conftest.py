"""Generation tests run their tiny models on one CPU thread (torch's pool only slows such small ops
when other programs share the 2 cores)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
