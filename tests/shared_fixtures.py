"""Fixtures shared by several test folders; a folder's conftest imports the ones it uses."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run the test on one torch thread: the tiny models' ops are too small to gain from torch's
    intra-op pool, and lose badly to it when other programs share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
