"""Defaults shared by the editing library and its CLI (kept free of heavy imports so that parsing the
command line imports no torch)."""

DEFAULT_MOM2_SCALE = 0.05   # MEMIT: lambda_l = this * mean k^T C_l^-1 k; one request writes ~95% of its shift
