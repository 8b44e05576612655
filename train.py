"""Train a GPT-2 on TinyStories: `python train.py` (GPU, seed model), `python train.py --preset tiny`
(CPU), `torchrun --nproc_per_node N train.py` (DDP). See `python train.py --help`."""

from gpt.train import exit_process, main

if __name__ == "__main__":
    exit_process(main())
