"""Generation tests run their tiny models on one CPU thread (torch's pool only slows such small ops
when other programs share the 2 cores)."""
from tests.shared_fixtures import one_thread  # noqa: F401  (autouse)
