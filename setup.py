from setuptools import find_packages, setup

setup(
    name="tinygpt-kit",
    version="0.1.0",
    description="A from-scratch GPT-2 trained on TinyStories, with Triton attention and LayerNorm kernels",
    packages=find_packages(include=["gpt", "gpt.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",  # checked: 2.11 and 2.13 (README, Kernels)
        "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'",  # checked: 3.6 and 3.9
        "numpy",
        "transformers",
        "datasets",
        "tiktoken",
        "matplotlib",
        "tqdm",
        "safetensors",
    ],
    # tensorboard: train.py --tensorboard DIR (optional); dev installs it so the tests cover it.
    extras_require={"tensorboard": ["tensorboard"], "dev": ["pytest", "pytest-benchmark", "tensorboard"]},
)
