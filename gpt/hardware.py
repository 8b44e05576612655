"""What the device is and how to run on it: data-sheet peaks, the default precision, autocast.

``train.py`` reports MFU from these peaks and the benchmarks their roofline percentages, so the
table lives in the package (an installed copy has it too).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import re
from pathlib import Path

import torch

# Dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (GB/s) from NVIDIA's SXM data sheets.
PEAKS = {
    "H100": {"bf16_tflops": 989.0, "hbm_gbs": 3350.0},
    "H200": {"bf16_tflops": 989.0, "hbm_gbs": 4800.0},
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A CPU's default: bf16 autocast where the CPU multiplies bf16 matrices in hardware (AMX), else fp32.
# The tiny preset on two 2-core machines, bf16 against fp32 measured back to back on each:
# - Intel Xeon with AMX-BF16, 200 steps of `python train.py` on the shared sample (busy): bf16 4,279
#   tokens/s vs fp32 2,954 (1.45x), test perplexity 89.6 vs 91.6; the seed-sized step ran 2.15x
#   faster in bf16 (README, "Measured");
# - AMD EPYC with AVX512-BF16 but no AMX, 16 x 128 tokens a step: bf16 7% faster when quiet, no
#   faster under load (1638 vs 1526, 270 vs 278 tokens/s): not worth bf16's precision there.
CPU_DEFAULT_DTYPE = "fp32"  # without AMX
AMX_CPU_DTYPE = "bf16"


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX's bf16 tiles (Linux: the ``amx_bf16`` flag in /proc/cpuinfo)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def default_dtype(device: torch.device | str, impl: str = "auto") -> str:
    """The autocast dtype a run uses unless told otherwise: bf16 on CUDA and on a CPU with AMX
    (``cpu_has_amx``), else fp32 (``CPU_DEFAULT_DTYPE``). ``impl="triton"`` on a CPU (Triton's
    interpreter, for checking) is fp32: the interpreter's bf16 dots are wrong."""
    if torch.device(device).type == "cuda":
        return "bf16"
    if impl == "triton":
        return "fp32"
    return AMX_CPU_DTYPE if cpu_has_amx() else CPU_DEFAULT_DTYPE


@contextlib.contextmanager
def tf32_matmuls(device: torch.device | str):
    """fp32 matrix products and convolutions in TF32 on CUDA for the block (tensor cores; what bf16
    autocast leaves in fp32 runs there too), the previous setting after it. The switches are
    process-wide: a run inside a longer process (the tests, a notebook) must not leave them on, as
    fp32 checks after it would then see TF32's 1e-3 errors. Elsewhere, nothing changes."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# glibc's mallopt parameters (malloc.h) and their defaults.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@functools.lru_cache(maxsize=None)
def _glibc():
    """The C library when it is glibc (whose ``mallopt`` and ``malloc_trim`` we call), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def host_memory_kept(device: torch.device | str):
    """A CPU run's freed memory kept by the allocator for the block, so that the next step's large
    tensors reuse it instead of fresh pages from the kernel; glibc's defaults after it, the memory
    handed back (``malloc_trim``). Elsewhere (CUDA runs, other C libraries), nothing changes.

    glibc maps every allocation above 32 MiB afresh and unmaps it when freed (and trims the heap's
    top), so a CPU training step's large tensors -- the head's weight gradient and its bf16 copies,
    the embedding's gradient, a GEMM's outputs -- each came back as new pages: ~15,000-27,000 page
    faults and as many unmappings a ``tiny`` step on this project's 2-core VM. With mmap off
    (``M_MMAP_MAX`` 0) and no trimming (``M_TRIM_THRESHOLD`` beyond any size) a ``tiny`` step took
    0.31-0.33 s instead of 0.45-0.48, and ``train.py --preset tiny`` (200 steps) ran 1.07-1.16x the
    tokens/s for at most 3.5% more peak memory (README, "Measured"). Process-wide, like ``tf32_matmuls``:
    scoped to a run so that a longer process (the tests, a notebook) gets glibc's behaviour back.
    """
    libc = _glibc() if torch.device(device).type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # an int: the largest glibc's mallopt takes
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


CPU_MEMORY_SHARE = 0.9  # of the memory free at a CPU run's start that it may use: a tenth left to the rest


def _proc_kib(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a Linux /proc file, in bytes; None where there is none."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path(path).read_text(), re.M)
    except OSError:
        return None
    return None if match is None else int(match.group(1)) * 1024


def memory_available() -> int | None:
    """Bytes the machine can give a process now without swapping (Linux's MemAvailable), else None."""
    return _proc_kib("/proc/meminfo", "MemAvailable")


@contextlib.contextmanager
def host_memory_capped(device: torch.device | str, processes: int = 1):
    """A CPU run's memory capped, for the block, at what the process holds plus its share of what
    the machine has free as the block starts (``CPU_MEMORY_SHARE`` of ``memory_available``, over
    ``processes``, the ranks on this machine), so that a run too large for the machine fails at the
    allocation that crosses it (torch's "DefaultCPUAllocator: can't allocate memory", which
    ``is_out_of_memory`` recognises) instead of being killed by the kernel's OOM killer without a
    word, or swapping for minutes. ``train.py --preset seed --batch-size 1024 --grad-accum 1`` on this
    project's 24 GB machine: the OOM killer ended it at 24.4 GB (SIGKILL, no message); capped, one
    line and exit 1 after 36 s, at a peak of 21.8 GB.

    The cap is Linux's RLIMIT_DATA (private writable memory: the heap and anonymous mappings, which
    hold every tensor; not the mapped libraries or files), the previous limit after the block. A
    lower limit already set is kept. Elsewhere (CUDA runs, no /proc), nothing changes. Code inside
    torch that does not check its allocations can still crash where the cap is crossed inside it:
    once in ~20 runs with the cap set just under a run's need (SDPA's CPU kernel, a segmentation
    fault), where without the cap the OOM killer's SIGKILL would have come instead.
    """
    free = memory_available() if torch.device(device).type == "cpu" else None
    held = _proc_kib("/proc/self/status", "VmData")
    if free is None or held is None:
        yield
        return
    import resource  # (Unix only: imported where /proc says this is Linux)

    before = soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = held + int(free * CPU_MEMORY_SHARE) // max(1, processes)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:
        yield
        return
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, before)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation: CUDA's, torch's CPU allocator's, Python's, or
    oneDNN's "could not create a primitive" where the process has reached its cap
    (``host_memory_capped``: oneDNN says no more when its scratch memory cannot be had)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error) if isinstance(error, RuntimeError) else ""
    return "DefaultCPUAllocator: can't allocate memory" in text or (
        "could not create a primitive" in text and _at_data_limit())


def _at_data_limit(margin: int = 64 << 20) -> bool:
    """Whether this process's private memory is within ``margin`` bytes of its RLIMIT_DATA."""
    held = _proc_kib("/proc/self/status", "VmData")
    if held is None:  # not Linux
        return False
    import resource

    soft = resource.getrlimit(resource.RLIMIT_DATA)[0]
    return soft != resource.RLIM_INFINITY and held > soft - margin


def out_of_memory_line(error: BaseException) -> str:
    """What ran out, in a few words: CUDA's first sentence, or the CPU allocation that did not fit
    (``host_memory_capped``)."""
    if isinstance(error, torch.OutOfMemoryError):
        text = str(error).strip()
        return text.splitlines()[0].split(". ")[0] if text else "out of memory"
    tried = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(error))
    size = f"an allocation of {int(tried.group(1)) / 2**20:,.0f} MiB failed; " if tried else ""
    return f"out of memory on the CPU ({size}a run may use the memory the machine had free when it started)"


def autocast(device: torch.device | str, dtype: str):
    """Mixed precision for ``dtype`` ("fp32": none) on ``device``. Without autocast's cast cache: the
    model casts each weight once a forward anyway, and a CUDA graph capturing the step
    (gpt.graphstep) must not keep the cache's tensors."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype], cache_enabled=False)


def device_peaks(device: torch.device | str = "cuda") -> dict:
    """Data-sheet peaks of a known CUDA device ({} for a CPU or an unknown GPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), {})


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak in FLOP/s of a known CUDA device, else None."""
    tflops = device_peaks(device).get("bf16_tflops")
    return None if tflops is None else tflops * 1e12


def environment(device: torch.device | str) -> dict:
    """Versions and the device name, recorded with every run's results."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.device(device)
    return {
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
    }
