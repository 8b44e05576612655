"""Every kernel variant the launchers can pick, compiled for sm_90 and sm_80 without a GPU.

``kernels.compile_check`` calls the public launchers under a stand-in Triton driver, compiles with
the JIT's own specialisation (in two worker processes, with Triton's JIT rather than this process's
interpreter) and reads each cubin's resources. Once per session: the attention kernels alone took
11 CPU-minutes to compile after a change to them (5 min 45 s on 2 cores), 10-30 seconds from
Triton's on-disk cache after.
Skipped only when the installed Triton has no NVIDIA backend.
"""

import copy
import os
import re

import pytest

import kernels.attention
from kernels import compile_check as cc
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

BIN_DIR, NO_BACKEND = cc.nvidia_tools()
needs_nvidia_backend = pytest.mark.skipif(BIN_DIR is None, reason=NO_BACKEND or "")


@pytest.fixture(scope="session")
def rows():
    return cc.compile_all(jobs=min(8, os.cpu_count() or 2))  # 2 on CI's 2 cores, more on a GPU host


def assert_none(found):
    assert not found, "\n".join(found)


@needs_nvidia_backend
def test_every_case_reaches_both_archs_and_every_kernel(rows):
    assert_none(cc.compile_errors(rows))
    reached = {(r["arch"], case) for r in rows for case in r["cases"]}
    assert reached == {(arch, c.label) for arch in cc.GATE for c in cc.cases() if c.on(arch)}
    assert_none(cc.uncovered(rows))


@needs_nvidia_backend
def test_no_register_spills(rows):
    assert_none(cc.spills(rows))


@needs_nvidia_backend
def test_shared_memory_within_the_block_limit(rows):
    assert_none(cc.shared_overflows(rows))


@needs_nvidia_backend
def test_half_precision_dots_on_tensor_cores_with_async_copies(rows):
    assert_none(cc.missing_tensor_cores(rows))
    dot_kernels = [r for r in rows if r["dots"]]
    assert dot_kernels and all(r["dtype"] in ("float16", "bfloat16") for r in dot_kernels)
    # The JIT's specialisation (unit head-dim stride, 16-byte alignment) is what lets the pipeline
    # stream tiles with cp.async: compiled from a hand-written signature with runtime strides, it
    # has none and its loads are scalar.
    assert_none([f"{r['arch']} {r['kernel']} {r['config']}" for r in dot_kernels if not r["cp_async"]])


@needs_nvidia_backend
def test_prune_estimate_covers_compiled_shared_memory_within_2x(rows):
    estimated = [r for r in rows if r["estimate"] is not None]
    assert {r["kernel"] for r in estimated} == set(kernels.attention._CUDA_CONFIGS)
    assert_none(cc.estimate_mismatches(rows))


@needs_nvidia_backend
def test_prune_keeps_16_row_blocks_for_short_queries_only(rows):
    for r in rows:
        if r["estimate"] is None:
            continue
        # (no 16-row forward compiles without spills with dropout at D = 128: the prune's fallback)
        short = {bool(re.search(r"Tq=1 |T=16 ", c)) and not (r["kernel"] == "_attn_fwd_kernel" and "dropout" in c
                                                            and c.endswith("D=128")) for c in r["cases"]}
        assert short == {r["config"]["BLOCK_M"] == 16}, (r["kernel"], r["config"], r["cases"])


@needs_nvidia_backend
def test_table_is_current(rows):
    """The committed table is what this code compiles to under the Triton it was made with."""
    committed = cc.TABLE.read_text()
    made_with = re.search(r"^Triton (\S+),", committed, re.M).group(1)
    if made_with != cc.triton.__version__:
        pytest.skip(f"{cc.TABLE.name} was made with Triton {made_with}, this is {cc.triton.__version__}")
    assert cc.markdown(rows) == committed, f"regenerate with: {cc.COMMAND}"


def good_row(**changes):
    row = {"arch": "sm_90", "kernel": "_attn_fwd_kernel", "case": "train T=256 float16 D=64",
           "cases": ["train T=256 float16 D=64"], "family": "attention", "dtype": "float16", "size": 64,
           "config": {"HEAD_DIM": 64, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
           "estimate": 70000, "error": None, "regs": 120, "stack": 0, "local": 0, "static_shared": 1024,
           "dynamic_shared": 65536, "shared": 66560, "dots": ["wgmma"] * 4, "cp_async": True,
           "vector_loads": True, "warps_per_sm": 16, "hash": "h"}
    return {**copy.deepcopy(row), **changes}


def test_checks_flag_what_they_should():
    assert not cc.problems([good_row()], archs=()) and not cc.spills([good_row()])
    assert cc.compile_errors([good_row(error="PTXASError: boom")])
    assert cc.spills([good_row(stack=16)]) and cc.spills([good_row(local=8)])
    assert cc.shared_overflows([good_row(shared=232_449)]) and not cc.shared_overflows([good_row(shared=232_448)])
    assert cc.shared_overflows([good_row(arch="sm_80", shared=166_913)])
    assert cc.missing_tensor_cores([good_row(dots=["wgmma", "fma", "wgmma", "wgmma"])])
    assert cc.missing_tensor_cores([good_row(dots=["mma"] * 4)])  # a 128-row block on sm_90: wgmma
    assert not cc.missing_tensor_cores([good_row(arch="sm_80", dots=["mma"] * 4)])
    assert not cc.missing_tensor_cores([good_row(config={**good_row()["config"], "BLOCK_M": 16}, dots=["mma"] * 4)])
    assert cc.estimate_mismatches([good_row(estimate=66559)]) and cc.estimate_mismatches([good_row(estimate=133121)])
    assert cc.uncovered([good_row()], archs=("sm_90",))  # the other kernels and configs are missing


def test_occupancy_estimate():
    hopper = cc.ARCHS["sm_90"]
    assert cc.warps_per_sm(hopper, regs=32, shared=0, warps=4) == 64  # the 64-warp cap
    assert cc.warps_per_sm(hopper, regs=255, shared=0, warps=8) == 8  # 256 regs x 256 threads: one block
    assert cc.warps_per_sm(hopper, regs=128, shared=0, warps=4) == 16  # 65536 / (128 x 128)
    assert cc.warps_per_sm(hopper, regs=32, shared=100_000, warps=4) == 8  # two blocks' shared memory
    assert cc.warps_per_sm(cc.ARCHS["sm_80"], regs=32, shared=100_000, warps=4) == 4
    assert cc.warps_per_sm(cc.ARCHS["sm_89"], regs=32, shared=0, warps=4) == 48  # GeForce: 48 warps
    assert cc.warps_per_sm(cc.ARCHS["sm_86"], regs=32, shared=0, warps=1) == 16  # ... and 16 blocks on sm_86
    assert cc.warps_per_sm(cc.ARCHS["sm_89"], regs=32, shared=60_000, warps=4) == 4  # 100 KiB an SM


def test_a_table_for_geforce_parts_says_their_targets_limits_and_command(tmp_path):
    """``--arch sm_89 sm_86`` (not CI's gate): the table's title, regeneration command and limits are
    those of the targets it holds, and its checks judge those targets' rows (99 KiB a block)."""
    rows = [good_row(arch="sm_89", dots=["mma"] * 4, shared=101_377, sizes=[64]),
            good_row(arch="sm_86", dots=["mma"] * 4, hash="g", sizes=[64])]
    table = cc.markdown(rows, tmp_path / "compile.md")
    assert table.startswith("# Kernels compiled for Ada (sm_89) and Ampere GeForce (sm_86) without a GPU\n")
    assert f"--out {tmp_path / 'compile.md'} --arch sm_89 sm_86`" in table
    assert "sm_89 102,400 B, sm_86 102,400 B; per-block limit sm_89 101,376 B, sm_86 101,376 B" in table
    assert "sm_89 24 and 48, sm_86 16 and 48" in table
    assert "101377 B shared > 101376 B per block" in table
    assert "- sm_89: kernel _layer_norm_fwd_kernel never compiled" in table
    assert "- sm_90" not in table and "- sm_80" not in table  # no gate target judged


def test_dot_forms_from_ttgir():
    ttgir = "\n".join([
        "#blocked = #ttg.blocked<{sizePerThread = [1, 8]}>",
        "#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0}>",
        "#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0}>",
        "%a = ttng.warp_group_dot %x, %y, %z {isAsync = true} : t * m -> tensor<128x64xf32, #mma> loc(#l)",
        "%w:3 = ttng.warp_group_dot_wait %a {pendings = 0 : i32} : tensor<128x64xf32, #mma> loc(#l)",
        "%b = tt.dot %x, %y, %z : tensor<16x64xf16, #d> * tensor<64x64xf16, #e> -> tensor<16x64xf32, #mma1>",
        "%c = tt.dot %x, %y, %z : tensor<16x64xf32, #d> * tensor<64x64xf32, #e> -> tensor<16x64xf32, #blocked>",
    ])
    assert cc.dot_forms(ttgir) == ["wgmma", "mma", "fma"]


def test_compiling_for_restores_triton_and_the_launcher(monkeypatch):
    """The stand-in driver and the patched run methods must not leak into the interpreter tests; the
    configurations a real run chose (``attention._Tuned``) are set aside meanwhile, so that every
    launch reaches the autotuner and every configuration compiles, and are back afterwards."""
    chosen = {("a key",): object()}
    monkeypatch.setattr(kernels.attention._attn_fwd, "chosen", chosen)
    before = (JITFunction.run, Autotuner.run, kernels.attention._launchable, driver._active)
    with cc.compiling_for(cc.ARCHS["sm_80"]) as compiled:
        assert driver.active.get_current_target().arch == 80
        assert driver.active.utils.get_device_properties(0)["max_shared_mem"] == 166_912
        assert JITFunction.run is not before[0] and kernels.attention._launchable("cpu")
        assert compiled == [] and all(t.chosen == {} for t in kernels.attention._TUNED)
    assert (JITFunction.run, Autotuner.run, kernels.attention._launchable, driver._active) == before
    assert kernels.attention._attn_fwd.chosen is chosen
