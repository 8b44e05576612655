"""The scoring command line (``python evaluate.py`` or ``python -m gpt.evaluation``): a model's
perplexity and next-token accuracy over every real token of a TinyStories split.

    python evaluate.py --model out/gpt2_best_model.pt          # the split the run trained beside
    python evaluate.py --model gpt2 --data ../shared/data/tinystories/tinystories-sample.jsonl \\
        --tokenizer ../shared/data/gpt2-tokenizer              # OpenAI's GPT-2 small on the same split
    python evaluate.py --model out/gpt2_best_model.pt --seed-protocol --json scores.json

``--model`` is what ``gpt.hf.load_pretrained`` takes: one of our checkpoints, a transformers GPT-2
directory, or a Hugging Face hub name. Our checkpoints record their run's data, tokenizer, cache and
story count; those are the defaults here, so a run's checkpoint is scored on the very split
train.py's final test pass used (same figure, up to summation order). Other models need ``--data``
(default: the hub's TinyStories) and take the seed's story count.

The protocol is train.py's: the split's stories packed with one EOS between them, in windows of the
model's context, every real token scored once, no padding (``gpt.step.TEST_PROTOCOL``).
``--seed-protocol`` adds the seed's (stories padded to 256 with EOS, padding counted), for
comparison with the seed's reported figures. On CUDA the forward is replayed from a CUDA graph
(``--no-cuda-graph``: eager), as train.py's validation and test passes are. Each pass shows a progress
bar with an ETA on stderr, as train.py's do (``--no-progress`` hides them). Bad input is one line on
stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, metavar="SOURCE",
                   help="one of our checkpoints (e.g. out/gpt2_best_model.pt), a transformers GPT-2 directory, or a "
                        "Hugging Face hub name (gpt2, ...)")
    p.add_argument("--data", help="TinyStories .txt/.jsonl/.parquet file or directory (default: the checkpoint's "
                                  "run's data, else the Hugging Face hub's roneneldan/TinyStories)")
    p.add_argument("--tokenizer", help="GPT-2 tokenizer directory (default: the checkpoint's run's, else "
                                       "$GPT2_TOKENIZER_DIR, tiktoken's gpt2, the hub)")
    p.add_argument("--cache-dir", help="token cache shared with train.py (default: the run's, else data_cache)")
    p.add_argument("--num-stories", type=int, help="stories split 70/20/10 (default: the run's, else the seed's)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split to score (default: test)")
    p.add_argument("--max-tokens", type=int, default=0, help="score at most this many tokens (default: 0, all)")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default: 16, on CUDA at least "
                                                  "65,536 tokens' worth, as train.py's validation)")
    p.add_argument("--seed-protocol", action="store_true", help="also score by the seed's protocol")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="autocast dtype (default: train.py's: bf16 on CUDA and on a CPU with AMX, else fp32)")
    p.add_argument("--impl", choices=("auto", "torch", "triton"), default="auto",
                   help="hot-op implementation (default: auto)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the forward from a CUDA graph, one per window length, captured at its second "
                        "batch (gpt.graphstep.GraphedEval; default: on CUDA)")
    p.add_argument("--json", metavar="PATH", help="also write the scores to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bars (on stderr, with an ETA: tokenizing a new data source, each pass)")
    return p


def graph_refusal(device) -> str | None:
    """Why the forward on ``device`` cannot be replayed from a CUDA graph, or None if it can."""
    return None if device.type == "cuda" else f"--cuda-graph needs a CUDA device, got {device}"


def _data_options(args, ckpt: dict | None) -> dict:
    """--data, --tokenizer, --cache-dir and --num-stories: given, else the checkpoint's run's, else defaults."""
    from gpt.config import SEED_NUM_STORIES
    from gpt.data import DEFAULT_CACHE_DIR

    run, train = ((ckpt.get("run_options") or {}), (ckpt.get("train_config") or {})) if ckpt else ({}, {})
    pick = {"data": args.data, "tokenizer": args.tokenizer, "cache_dir": args.cache_dir,
            "num_stories": args.num_stories}
    defaults = {"data": None, "tokenizer": None, "cache_dir": DEFAULT_CACHE_DIR, "num_stories": SEED_NUM_STORIES}
    recorded = {"data": run.get("data"), "tokenizer": run.get("tokenizer"), "cache_dir": run.get("cache_dir"),
                "num_stories": train.get("num_stories")}
    return {k: pick[k] if pick[k] is not None else recorded[k] if recorded[k] is not None else defaults[k]
            for k in pick}


def run(args) -> dict:
    import torch

    from gpt.checkpoint import load_checkpoint, model_of
    from gpt.data import prepare_data
    from gpt.errors import UserError
    from gpt.graphstep import GraphedEval
    from gpt.hardware import default_dtype, host_memory_capped, host_memory_kept, tf32_matmuls
    from gpt.hf import load_pretrained
    from gpt.step import TEST_PROTOCOL, default_eval_batch, evaluate, evaluate_seed_protocol
    from gpt.tokenizer import get_tokenizer

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-tokens", args.max_tokens, 0),
                             ("--num-stories", args.num_stories, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    dtype = args.dtype or default_dtype(device, args.impl)
    refusal = graph_refusal(device)
    if args.cuda_graph and refusal is not None:
        raise UserError(refusal)
    graphed = refusal is None if args.cuda_graph is None else args.cuda_graph
    path = Path(args.model).expanduser()
    ckpt = load_checkpoint(path) if path.is_file() else None  # ours: it also names its run's data
    model = model_of(ckpt, path) if ckpt is not None else load_pretrained(args.model)
    opts = _data_options(args, ckpt)
    tokenizer = get_tokenizer(opts["tokenizer"])
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
    splits = prepare_data(opts["data"], tokenizer, cache_dir=opts["cache_dir"], num_stories=opts["num_stories"],
                          progress=args.progress)
    tokens = getattr(splits, args.split)
    model.impl = args.impl
    model = model.to(device)
    context = model.config.max_seq_length
    batch = args.batch_size or default_eval_batch(16, context, device, args.max_tokens)
    forward = GraphedEval(model, device=device, dtype=dtype, batch_size=batch) if graphed else None
    # As train.py scores its runs (the same figures), and capped as its runs are.
    with tf32_matmuls(device), host_memory_kept(device), host_memory_capped(device):
        scores = evaluate(model, tokens, context, batch, device, dtype, args.max_tokens,
                          desc=args.split if args.progress else None, forward=forward)  # under autocast
        seed = (evaluate_seed_protocol(model, tokens, batch, device, dtype, forward=forward,
                                       desc=f"{args.split}, the seed's protocol" if args.progress else None)
                if args.seed_protocol else None)
    result = {"model": args.model, "split": args.split, **scores, "protocol": TEST_PROTOCOL,
              "data": splits.meta.get("source"), "num_stories": opts["num_stories"], "context": context,
              "device": str(device), "dtype": dtype}
    if seed is not None:
        result["seed_protocol"] = seed
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from gpt.errors import UserError, one_line

    try:
        result = run(args)
        if args.json:
            from gpt.checkpoint import atomic_write

            atomic_write(Path(args.json), lambda f: f.write(json.dumps(result, indent=2).encode()))
    except (UserError, ValueError, OSError) as e:
        print(f"evaluate.py: error: {one_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        from gpt.hardware import is_out_of_memory, out_of_memory_line

        if not is_out_of_memory(e):
            raise
        print(f"evaluate.py: error: {out_of_memory_line(e)}: lower --batch-size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("evaluate.py: interrupted", file=sys.stderr)
        return 130
    print(f"{result['split']} perplexity {result['perplexity']:.2f} | accuracy {100 * result['accuracy']:.1f}% | "
          f"{result['tokens']:,} tokens of {result['data']} ({result['device']} {result['dtype']}): {result['protocol']}")
    seed = result.get("seed_protocol")
    if seed is not None:
        print(f"the seed's protocol: perplexity {seed['perplexity']:.2f}, accuracy {100 * seed['accuracy']:.1f}% over "
              f"{seed['rows']:,} stories" if seed["perplexity"] is not None else f"the seed's protocol: {seed['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
