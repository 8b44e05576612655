"""Score a model on TinyStories: `python evaluate.py --model out/gpt2_best_model.pt` (perplexity and
next-token accuracy over every real token of the test split). See `python evaluate.py --help`."""

import sys

from gpt.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
