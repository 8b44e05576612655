"""Launching a Triton kernel again without the JIT's per-call dispatch.

``JITFunction.run`` does the same work on every launch: it binds the 10-40 arguments, specialises
each one (a tensor's dtype and 16-byte alignment, an int's divisibility by 16 or value 1), hashes
that into its cache key, checks the kernel's globals, builds the launch metadata, then calls the
compiled kernel's launcher. That took ~20 us a launch on this project's CPU (Triton 3.6 and 3.9,
``bench/test_bench_host.py``), more than our kernels take on a GPU at the model's sizes.

``Direct(fn)`` launches ``fn`` the JIT's way the first time it sees a launch key, keeps the compiled
kernel the JIT chose, and on later launches with that key calls the kernel's launcher directly
(the same call the JIT makes). The key is the current device, each tensor argument's dtype and
whether its address is a multiple of 16, the value and type of every other argument, and the
keyword arguments (constexprs and launch options) with their types: finer than everything Triton
specialises on, so a key never maps to two compiled kernels. ``tests/test_launch.py`` checks, on
a stand-in sm_90 driver that records launches, that the direct launches reach the same compiled
kernels with the same arguments and grids as the JIT's own dispatch.

What the JIT does on every launch and a direct launch does on a key's first only: checking that
the kernel's global variables have not changed, and reading Triton's debug and instrumentation
knobs (changing those mid-process needs ``through_jit``). Launch hooks (a profiler's) are honoured
on every launch. Keyword arguments must be constexprs or launch options (their values are part of
the key); runtime arguments go positionally. Under Triton's interpreter nothing is kept (the
interpreter compiles nothing) and every launch is the interpreter's; under a Triton outside the
tested versions (``TESTED``) every launch is the JIT's.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from typing import Iterator

import torch
import triton
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

TESTED = ((3, 6), (3, 9))  # Triton versions (major, minor) whose launch protocol tests/test_launch.py checked


def protocol_known(version: str) -> bool:
    """Whether Triton ``version`` launches compiled kernels as the tested versions do (the arguments
    ``JITFunction.run`` gives ``CompiledKernel.run``, which this module repeats). Another version's
    launches all go through its JIT: slower on the host, never wrong."""
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    return TESTED[0] <= major_minor <= TESTED[1]


_enabled = protocol_known(triton.__version__)


@contextlib.contextmanager
def through_jit() -> Iterator[None]:
    """Within the block every launch goes through ``JITFunction.run`` (what ``kernels.compile_check``
    and the host benchmark patch), and nothing it returns is kept for later direct launches."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


_SCALARS = frozenset({int, float, bool, type(None)})  # what may follow the tensors in a keyed launch
MAX_KEYS = 1024  # per kernel; past it, new keys go through the JIT (float arguments are keyed by value)


def _or(values: list) -> int:
    return functools.reduce(operator.or_, values, 0)


def _hooked(hook) -> bool:
    """Whether a launch hook does anything (Triton 3.6+ keeps an empty ``HookChain`` by default)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class Direct:
    """``fn`` (a ``@triton.jit`` function) launched as ``kernel[grid](*args, **constexprs)``, past the
    JIT's dispatch once a launch key has been through it. ``grid`` is a tuple of 1-3 ints.

    The key reads the leading tensor arguments one by one (dtype, alignment) and the rest in bulk
    (values and types, in C): ``tensors`` is how many lead in this kernel's launches, learnt from
    the first. A launch that does not fit that layout (a tensor later, a non-tensor among the first
    ``tensors``, another type) goes through the JIT.
    """

    def __init__(self, fn):
        self.fn = fn
        self.jit = isinstance(fn, JITFunction)  # False under the interpreter: no compiled kernel to keep
        self.tensors = None  # leading tensor arguments of the first launch
        # launch key -> (the JIT's compiled kernel, the constexpr values after the positional args)
        self.kernels: dict[tuple, tuple] = {}

    def __getitem__(self, grid: tuple):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        if not (_enabled and self.jit):
            self.fn[grid](*args, **kwargs)
            return
        n = self.tensors
        if n is None:
            n = self.tensors = next((i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)), len(args))
        rest = args[n:]
        device = driver.active.get_current_device()
        try:
            tensors = args[:n]
            pointers = [t.data_ptr() for t in tensors]
            # Alignment as Triton specialises it: all tensors' addresses on 16 bytes (the usual case),
            # else each one's.
            aligned = not (_or(pointers) & 15) or tuple(not p & 15 for p in pointers)
            # (an int 1 and True, or 2 and 2.0, are equal but typed apart: the types are in the key)
            key = (device, aligned, *kwargs.items(), *map(type, kwargs.values()), *[t.dtype for t in tensors],
                   *rest, *map(type, rest))
            entry = self.kernels.get(key)
        except (AttributeError, TypeError):  # not a tensor among the first n; an unhashable argument
            self.fn[grid](*args, **kwargs)
            return
        if entry is None:
            if _SCALARS.issuperset(map(type, rest)):  # (a key kept has passed this check)
                self._first_launch(key, grid, args, kwargs)
            else:
                self.fn[grid](*args, **kwargs)
            return
        kernel, constexprs = entry
        stream = driver.active.get_current_stream(device)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        if _hooked(enter) or _hooked(leave):  # as the JIT does
            metadata = kernel.launch_metadata(grid, stream, *args, *constexprs)
        else:  # no hook to call: the JIT would build metadata and call two empty hook chains
            metadata = enter = leave = None
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, metadata, enter, leave,
                   *args, *constexprs)

    def _first_launch(self, key: tuple, grid: tuple, args: tuple, kwargs: dict) -> None:
        """Launch through the JIT and keep the compiled kernel it returns (none in the interpreter)."""
        params = self.fn.params[len(args):]
        runtime = [p.name for p in params if p.name in kwargs and not p.is_constexpr]
        if runtime:
            raise TypeError(f"{self.fn.__name__}: runtime arguments {runtime} must be passed positionally")
        kernel = self.fn[grid](*args, **kwargs)
        if kernel is None or not hasattr(kernel, "packed_metadata") or len(self.kernels) >= MAX_KEYS:
            return
        self.kernels[key] = kernel, tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params)
