"""Validation, autograd and ``torch.library`` registration of every op, one file per op."""
