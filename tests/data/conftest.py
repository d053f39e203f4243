"""Data tests: fixture paths; the tiny models they run use one torch thread (the trainers' tests' fixture)."""
import os

from tests.train.conftest import one_thread  # noqa: F401  (autouse fixture, shared)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)
