"""Host-side helpers of the launchers: integer arithmetic for grids and block sizes, on plain
Python ints, and the dropout kernels' seed.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` objects in Triton 3.6 and
3.9: about 4 us a call on the host (measured on this project's CPU), against ~0.1 us here. A launch
makes several such calls, and on a GPU our small launches are host-bound (bench/results/*-NVIDIA-*).
"""


import torch


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A call's dropout seed (1,) int64 on ``device``, from torch's generator: reproducible under
    ``torch.manual_seed``, and redrawn by every replay of a CUDA graph that captured it."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length()
