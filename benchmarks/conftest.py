import os

import torch

# As in tests/: on a CPU-only machine the kernels run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
