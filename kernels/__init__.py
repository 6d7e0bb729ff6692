"""Triton kernels and their thin launchers, installed as ``lightllm.kernels``.

Nothing here imports ``torch.nn`` or does validation: ``lightllm.ops`` checks inputs and owns autograd.
"""
