"""Alignment loops over the trainers, generation and evaluation: constitutions, Constitutional AI's
critique -> revision chains (``cai-sl``), AI-feedback preference labels (``rlaif``), self-critique,
and iterated pipelines of stages over rounds. See docs/alignment.md."""
from peftkern.alignment.constitution import Constitution, ConstitutionError, Principle, load_constitution

__all__ = ["Constitution", "ConstitutionError", "Principle", "load_constitution"]
