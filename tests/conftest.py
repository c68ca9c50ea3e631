import os

import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which triton reads when kernels are
# decorated (at import): set it before any test module imports triton (timm and torch can import it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
