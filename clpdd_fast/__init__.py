"""clpdd-fast: CLP-DD dataset distillation ops (ridge probe + streamed temperature-softmax CE) and pipeline."""
from clpdd_fast.ops import clpdd_loss, gram, linear_softmax_ce, ridge_solve
from clpdd_fast.validation import NotPositiveDefiniteError

__all__ = ["gram", "ridge_solve", "linear_softmax_ce", "clpdd_loss", "NotPositiveDefiniteError"]
__version__ = "0.1.0"
