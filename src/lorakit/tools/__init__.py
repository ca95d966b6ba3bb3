"""SVD tools on adapters as stored: extract one from a full fine-tune, resize, combine, inspect, compare.

What the command line needs to build its flags lives here, apart from the tools themselves, so that
`lorakit --help` does not import torch.
"""

from typing import Literal, get_args

__all__ = ["COMBINE_METHODS", "CombineMethod"]

CombineMethod = Literal["svd", "cat", "linear"]  # how `combine` makes one adapter of several (lorakit.tools.resize)
COMBINE_METHODS = get_args(CombineMethod)
