"""What the tests share: the device kernel tests run on, and the perturbed model.

DEVICE is CUDA when there is a GPU, else the CPU, where the root ``conftest.py`` has turned on
Triton's interpreter. Every test that runs a Triton kernel puts its tensors and models there (test
modules import it: ``from conftest import DEVICE, perturbed_model``; pytest loads this file as
``conftest`` before it collects the modules beside it). Tests of the reference path alone stay on
the CPU. Triton is a hard dependency on Linux x86_64 (setup.py): the kernel tests fail, not skip,
without it.
"""

import torch

from gpt import GPT2Model, GPTConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_ONLY_REASON = "needs CUDA: Triton's interpreter returns garbage for tl.dot on bf16"


def perturbed_model(config: GPTConfig, *, device, seed: int = 0) -> GPT2Model:
    """An impl="torch" model (eval mode, on ``device``) whose biases and LayerNorm weights are off
    their defaults (zeros and ones), so that a kernel mixing them up cannot match the reference.

    The weights come from ``seed`` on the CPU's generator: the same values on every device.
    """
    torch.manual_seed(seed)
    model = GPT2Model(config, impl="torch")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device).eval()
