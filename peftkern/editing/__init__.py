"""Model editing: ROME and MEMIT, each edit returned as a low-rank delta and saved as a LoRA adapter.

    from peftkern.editing import rome, memit, evaluate_edits
    edit = rome(model, tok, {"prompt": "The capital of {} is", "subject": "Velora", "target_new": "Pelm"})
    edited = edit.apply(model)          # a PeftKernModel with the edit as adapter "edit", switched on
    edit.save(model, "velora-pelm/")    # PEFT's adapter files; peftkern.load_adapter / PeftModel load it

See docs/editing.md.
"""
from peftkern.editing.compute import ValueSettings
from peftkern.editing.edit import Edit, combine
from peftkern.editing.facts import bundled_corpus, bundled_facts, bundled_requests, fact_sentences
from peftkern.editing.memit import memit
from peftkern.editing.metrics import evaluate_edits, ngram_entropy
from peftkern.editing.requests import EditError, EditRequest, Neighbour, load_requests, save_requests
from peftkern.editing.rome import rome, rome_sequential
from peftkern.editing.stats import KeyStats, key_statistics
from peftkern.editing.trace import Trace, causal_trace, locate_layer, peak_layer

__all__ = ["rome", "rome_sequential", "memit", "Edit", "combine", "EditRequest", "Neighbour", "EditError", "ValueSettings",
           "load_requests", "save_requests", "evaluate_edits", "ngram_entropy", "key_statistics", "KeyStats",
           "causal_trace", "locate_layer", "peak_layer", "Trace", "bundled_facts", "bundled_requests", "bundled_corpus",
           "fact_sentences"]
