"""Editing tests run micro models (random weights, the byte tokenizer's vocabulary) on one CPU thread."""
import pytest
from tests.shared_fixtures import one_thread  # noqa: F401  (autouse)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Key statistics are cached under a per-test folder, never in the user's cache."""
    monkeypatch.setenv("PEFTKERN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tok():
    from peftkern.models import build_byte_tokenizer

    return build_byte_tokenizer()
