"""``kernels.launch.Direct``: after a launch key's first launch, kernels are launched past the JIT's
per-call dispatch. A wrong key would launch a kernel compiled for other arguments (another dtype,
alignment, a stride once specialised as 1 or as a multiple of 16) and give wrong results silently.

No GPU here, so the check runs in a child process (Triton's JIT, not this process's interpreter) on
``kernels.compile_check.RecordingDriver``: the compile check's stand-in sm_90 driver, whose
launchers record what they are asked to run. The same calls run twice: every launch through the JIT
(``launch.through_jit``), then with direct launches. Both must ask for the same launches -- the same
compiled kernel (its handle), grid, stream and arguments -- while the direct run goes through the
JIT only on each key's first launch. The calls: a probe kernel whose arguments walk Triton's
specialisation rules (an int 1, a multiple of 16, neither, past int32; a tensor's dtype and
16-byte alignment; a float's value; a constexpr True against 1), a kernel whose arguments the key
does not cover (a tensor after an int: always through the JIT), and the public kernels as the model
calls them (LayerNorm and add + LayerNorm forward and backward, attention forward and backward
through its autotuned launches, split-K decoding).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.compile_check import nvidia_tools

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r'''
import json, sys
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

import kernels
from kernels import attention, compile_check, launch
from kernels.attention import _attention_backward, _attention_forward


@triton.jit
def probe(X, Y, stride, n, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(X + i * stride, mask=i < n)
    if FLAG:
        x = x * scale
    tl.store(Y + i * stride, x, mask=i < n)


@triton.jit
def mixed(X, n, Y, BLOCK: tl.constexpr):  # a tensor after an int: never keyed, always the JIT's
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n), mask=i < n)


rec = compile_check.RecordingDriver(compile_check.ARCHS["sm_90"])
driver.set_active(rec)
attention._launchable = lambda device: True
Autotuner._bench = lambda self, *args, config, **kw: [float(config.num_warps)] * 3  # made up, deterministic
for tuned in attention._TUNED:
    tuned.tuner.cache_results = False  # made-up choices stay out of Triton's cache
jit_runs = []
jit_run = JITFunction.run
JITFunction.run = lambda self, *a, **kw: jit_runs.append(self.__name__) or jit_run(self, *a, **kw)

torch.manual_seed(0)
buf = torch.zeros(4096)
x32, y32 = buf[:64], buf[1024:1088]
x_off = buf[2049:2113]  # 4 bytes past a 16-byte boundary
x16, y16 = torch.zeros(64, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16)
p = launch.Direct(probe)
base = dict(FLAG=True, BLOCK=16)
probe_calls = [  # each changes one thing from the first
    lambda: p[(1,)](x32, y32, 3, 5, 2.0, **base),
    lambda: p[(1,)](x32, y32, 3, 5, 0.5, **base),  # another float: its own key, the same kernel
    lambda: p[(1,)](x32, y32, 17, 5, 2.0, **base),  # another int that Triton does not specialise
    lambda: p[(1,)](x32, y32, 1, 5, 2.0, **base),  # 1: a constant
    lambda: p[(2,)](x32, y32, 16, 5, 2.0, **base),  # a multiple of 16 (and another grid)
    lambda: p[(1,)](x32, y32, 3, 1 << 33, 2.0, **base),  # past int32
    lambda: p[(1,)](x_off, y32, 3, 5, 2.0, **base),  # an address off 16 bytes
    lambda: p[(1,)](x16, y16, 3, 5, 2.0, **base),  # bf16
    lambda: p[(1,)](x32, y32, 3, 5, 2.0, FLAG=False, BLOCK=32, num_warps=2),
    lambda: p[(1,)](x32, y32, 3, 5, 2.0, FLAG=1, BLOCK=16),  # 1, not True: its own key
]


def hooked():
    """A launch hook (a profiler's) is called on direct launches too, with the kernel's metadata."""
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        p[(1,)](x32, y32, 3, 5, 2.0, **base)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


hooked_names = []


def hook(metadata):
    hooked_names.append(metadata.get()["name"])


probe_calls.append(hooked)
m = launch.Direct(mixed)
probe_calls.append(lambda: m[(1,)](x32, 5, y32, BLOCK=16))
probe_calls.append(lambda: p[(1,)](x32, y32, 3, 5, 2, **base))  # an int equal to the first call's float
try:
    p[(1,)](x32, y32, 3, 5, scale=2.0, **base)
    refused = None
except TypeError as e:
    refused = str(e)

N = 96
x = torch.randn(2, 7, N, dtype=torch.bfloat16, requires_grad=True)
r = torch.randn(2, 7, N, dtype=torch.float32, requires_grad=True)
w = torch.randn(N, requires_grad=True)
b = torch.randn(N, requires_grad=True)
wide = torch.randn(14, N + 8)[:, :N]  # row stride 104
qkv = torch.randn(2, 40, 3, 3, 64, dtype=torch.bfloat16)  # (B, T, 3, H, D): strided q, k, v views
q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
cache = torch.randn(2, 3, 128, 64, dtype=torch.bfloat16)
lens = torch.tensor([70, 128])
starts = torch.tensor([0, 5])


def layer_norms():
    y = kernels.layer_norm(x, w, b)
    y.backward(torch.ones_like(y))
    y, s = kernels.add_layer_norm(x, r, w, b, out_dtype=torch.bfloat16)
    (y.float().sum() + s.sum()).backward()
    kernels.layer_norm(wide, w.detach(), b.detach())


def attentions():
    o, lse = _attention_forward(q, k, v, 0.125, None)
    _attention_backward(torch.ones_like(o), q, k, v, o, lse, 0.125, None)
    _attention_forward(q[:, :, -1:], k, v, 0.125, starts)  # a decode step with kv_start


def decodes():
    for splits in (1, 3):
        kernels.decode_attention(q[:, :, :1], cache, cache, lens, starts, num_splits=splits)


calls = probe_calls + [layer_norms, attentions, decodes]
inputs = {t.data_ptr() for t in (buf, x32, y32, x_off, x16, y16, x, r, w, b, wide, qkv, q, k, v, cache, lens, starts)}


def normal(arg):
    """A recorded argument, comparable across the two runs: a new tensor (an output) by its layout."""
    if isinstance(arg, torch.Tensor):
        ptr = arg.data_ptr()
        return ["tensor", str(arg.dtype), list(arg.shape), list(arg.stride()), ptr % 16, ptr if ptr in inputs else None]
    return arg if arg is None or isinstance(arg, (int, float, str)) else repr(arg)


def run(through_jit):
    """Each call three times: [launches] per call and repeat, JIT runs per call and repeat, hooked."""
    for tuned in attention._TUNED:
        tuned.chosen, tuned.tuner.cache = {}, {}
    rec.launches.clear()
    hooked_names.clear()
    per_call, runs = [], []
    for call in calls:
        for _ in range(3):  # a key's first launch; an autotuned key's first direct one; direct
            start, jit_runs[:] = len(rec.launches), []
            if through_jit:
                with launch.through_jit():
                    call()
            else:
                call()
            per_call.append([[name, function, list(grid), stream, [normal(a) for a in args]]
                             for name, function, grid, stream, args in rec.launches[start:]])
            runs.append(len(jit_runs))
    return per_call, runs, list(hooked_names)


jit, jit_names, jit_hooked = run(through_jit=True)
direct, direct_names, direct_hooked = run(through_jit=False)
print(json.dumps({"refused": refused, "jit": jit, "direct": direct, "hooked": [jit_hooked, direct_hooked],
                  "jit_runs": jit_names, "direct_runs": direct_names,
                  "kept": {name: len(d.kernels) for name, d in [("probe", p), ("mixed", m), ("layer_norm_fwd", sys.modules["kernels.layernorm"]._layer_norm_fwd),
                           ("attn_fwd", attention._attn_fwd.direct), ("decode_split", sys.modules["kernels.decode_attention"]._decode_split)]}}))
'''


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    if nvidia_tools()[0] is None:
        pytest.skip("the installed Triton has no NVIDIA backend")
    script = tmp_path_factory.mktemp("launch") / "child.py"  # @triton.jit needs its source in a file
    script.write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_direct_launches_ask_for_what_the_jit_asks_for(recorded):
    jit, direct = recorded["jit"], recorded["direct"]
    assert len(jit) == len(direct) and all(jit)  # every call launched something
    for i, (a, b) in enumerate(zip(jit, direct)):
        assert a == b, f"call {i // 3}, repeat {i % 3}:\n jit    {a}\n direct {b}"


def test_a_launch_hook_is_called_on_direct_launches_too(recorded):
    assert recorded["hooked"] == [["probe"] * 3] * 2


def test_each_key_goes_through_the_jit_once(recorded):
    """With direct launches a call's third repeat never goes through the JIT, nor does its second
    unless it launches an autotuned kernel (the autotuner launched its first)."""
    launches = [len(c) for c in recorded["direct"]]
    assert recorded["jit_runs"] == launches  # through_jit: every launch
    runs = recorded["direct_runs"]
    first = launches[0::3]
    first[10] = 0  # the hooked call has the first call's key
    assert runs[0::3] == first
    assert runs[2::3] == [0] * 11 + [1] + [0] * 4  # the mixed kernel: every launch through the JIT
    second = [i for i, n in enumerate(runs[1::3]) if n]
    attention_calls = [i for i, c in enumerate(recorded["direct"][0::3]) if c[0][0] == "_attn_fwd_kernel"]
    assert second == sorted([11] + attention_calls)
    kept = recorded["kept"]
    assert kept["probe"] == 11 and kept["mixed"] == 0
    assert kept["layer_norm_fwd"] == 3 and kept["attn_fwd"] == 2 and kept["decode_split"] == 2


def test_the_probe_reached_distinct_kernels_where_triton_specialises(recorded):
    """The probe's calls reach Triton's specialisations: an int 1, a multiple of 16, past int32, an
    address off 16 bytes, bf16, other constexprs, and an int where the first call passed a float,
    each compiled apart from the first call; two floats, and two ints that Triton does not tell
    apart (3 and 17), launch one kernel."""
    functions = [c[0][1] for c in recorded["jit"][:30:3]]
    assert functions[0] == functions[1] == functions[2]
    assert len({functions[0], *functions[3:9]}) == 7
    assert recorded["jit"][36][0][1] != functions[0]  # the int 2 against the float 2.0


def test_a_runtime_argument_passed_by_keyword_is_refused(recorded):
    """Keyword values are part of the key, so only constexprs and options may be keywords: a runtime
    value passed by keyword would be launched with its first call's value."""
    assert recorded["refused"] == "probe: runtime arguments ['scale'] must be passed positionally"


def test_the_interpreter_keeps_nothing():
    """Under Triton's interpreter (this process on a CPU) every launch is the interpreter's, and no
    driver is asked for a device (there is none)."""
    import kernels

    if torch.cuda.is_available():
        pytest.skip("a GPU runs the JIT")
    x = torch.randn(3, 32)
    y = kernels.layer_norm(x, torch.ones(32), torch.zeros(32))
    assert torch.allclose(y, torch.nn.functional.layer_norm(x, (32,)), atol=1e-5)
    assert not kernels.layernorm._layer_norm_fwd.jit and kernels.layernorm._layer_norm_fwd.kernels == {}


def test_direct_launches_only_where_the_launch_protocol_was_tested():
    """The installed Triton's launches go direct (CI and the GPU image run tested versions); a
    version outside the tested range would launch through its JIT."""
    import triton

    from kernels import launch

    assert launch.protocol_known(triton.__version__) and launch._enabled
    assert launch.protocol_known("3.6.0") and launch.protocol_known("3.9.1") and launch.protocol_known("3.7.0")
    assert not launch.protocol_known("3.5.1") and not launch.protocol_known("3.10.0")
    assert not launch.protocol_known("4.0.0")
