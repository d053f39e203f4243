"""Trainer tests run their tiny models on one CPU thread: with threads contending for 2 cores, torch's
intra-op pool makes small ops many times slower, not faster."""
from tests.shared_fixtures import one_thread  # noqa: F401  (autouse)
