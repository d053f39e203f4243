"""Preference data: candidate answers to compare (``sample_candidates``), the labels database and its
web page (``peftkern label serve``; the page itself, ``peftkern.labeling.app``, needs Flask),
agreement statistics, export to TRL's preference format, and active learning. See docs/labeling.md."""
from peftkern.labeling.active import bt_uncertainty, ensemble_disagreement, prioritize, uncertainties
from peftkern.labeling.agreement import agreement_report, cohen_kappa, fleiss_kappa, krippendorff_alpha
from peftkern.labeling.db import LabelDB, SchemaError
from peftkern.labeling.export import export_pairs, export_rankings
from peftkern.labeling.items import Item, LabelError, UnknownItem, read_items
from peftkern.labeling.sampling import SamplingPlan, sample_candidates

__all__ = ["LabelDB", "SchemaError", "Item", "LabelError", "UnknownItem", "read_items", "cohen_kappa",
           "fleiss_kappa", "krippendorff_alpha", "agreement_report", "export_pairs", "export_rankings",
           "bt_uncertainty", "ensemble_disagreement", "uncertainties", "prioritize", "SamplingPlan",
           "sample_candidates"]
