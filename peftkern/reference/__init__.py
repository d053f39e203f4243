"""Pure-PyTorch definitions of every peftkern op: what the kernels are tested against."""
