"""The engine tests' model: TinyNet (helpers.py) with fixed weights, and a batch of its tokens."""

import pytest
import torch
from helpers import TinyNet


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tokens():
    return torch.randint(0, 30, (4, 7), generator=torch.Generator().manual_seed(1))
