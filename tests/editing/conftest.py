"""Editing tests run micro models (random weights, the byte tokenizer's vocabulary) on one CPU thread."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Key statistics are cached under a per-test folder, never in the user's cache."""
    monkeypatch.setenv("PEFTKERN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tok():
    from peftkern.models import build_byte_tokenizer

    return build_byte_tokenizer()
