"""The ops, with the exact semantics of their PyTorch twins (DESIGN.md §3)."""
