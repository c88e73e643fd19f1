"""Model tests run their convolutions on one thread.

The networks here are tiny (ResNet-18 on 128-pixel images), so each convolution is dominated by
OpenMP's thread synchronisation; on a 2-core machine shared with other processes that makes a
forward pass 50 times slower with two threads than with one.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
