"""lorakit: LoRA for PyTorch.

import lorakit as lk
lk.lowrank.rank(W)            # the low-rank toolkit
"""

from lorakit import lowrank

__all__ = ["lowrank"]
__version__ = "0.1.0"
