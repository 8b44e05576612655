"""Sample stories from a trained checkpoint (or a transformers GPT-2 directory) with the KV-cache sampler.

    python sample.py --prompt "In a magical forest"
    python sample.py --prompt "Once upon a time" --prompt "The dog" --num-samples 2 --seed 0
    python sample.py --hf path/to/gpt2 --stream
    python sample.py --prompt - < prompts.txt   # a prompt a line of stdin, each sampled as it is read
    python sample.py --quantize int8            # CPU: int8 weights, the fastest CPU decoding
    python sample.py --compile --num-samples 64 # GPU: the decode step compiled (and a CUDA graph)
    python sample.py --no-cuda-graph            # GPU: every decode step launched from Python

On CUDA the eager decode step is replayed from a CUDA graph by default (captured once, on the
second token; no compilation).

On a CPU, --impl triton runs the kernels in Triton's interpreter (slow; for checking only).

Bad input ends with one line on stderr and exit code 1. Ctrl-C while sampling prints the text
generated so far, then one line on stderr, and exits with code 130 (SIGTERM: the same, code 143). A prompt longer than the
context is cut to its last tokens, with a one-line notice. See gpt/generate.py for how padding,
long prompts and running past the context are handled.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 1, like every other bad input
        self.exit(1, f"{self.prog}: error: {message}\n")


class _ShowDefaults(argparse.HelpFormatter):
    """Every option's default in --help: the value, "off" for a flag, or the help's own words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        return text + (" (default: off)" if action.default is False else " (default: %(default)s)")


def _number(kind, ok, rule: str):
    """An argparse type that also checks the range (bad flags fail before torch is imported)."""
    def parse(text: str):
        value = kind(text)  # ValueError: argparse reports an invalid value
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sample.py", description="Sample text from a GPT-2 checkpoint.",
                formatter_class=_ShowDefaults)
    p.add_argument("--prompt", action="append",
                   help="prompt text (repeatable; default 'Once upon a time'); '-': a prompt a line of stdin, each "
                        "sampled as soon as it is read (the model loaded once; blank lines skipped), until EOF")
    p.add_argument("--checkpoint", default="out/gpt2_best_model.pt", help="checkpoint from train.py")
    p.add_argument("--hf", metavar="SOURCE", help="sample from a transformers GPT-2 directory or a Hugging Face hub "
                                                 "name (gpt2, ...) instead of --checkpoint (default: none)")
    p.add_argument("--max-new-tokens", type=_number(int, lambda n: n >= 1, ">= 1"), default=200,
                   help="new tokens per sample (fewer if EOS comes first)")
    p.add_argument("--temperature", type=_number(float, lambda t: t >= 0, ">= 0"), default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=_number(int, lambda k: k >= 0, ">= 0"), default=40, help="0 = no limit")
    p.add_argument("--top-p", type=_number(float, lambda x: 0 < x <= 1, "in (0, 1]"), default=0.95,
                   help="nucleus: smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, help="seed for reproducible samples (default: random)")
    p.add_argument("--num-samples", type=_number(int, lambda n: n >= 1, ">= 1"), default=1, help="samples per prompt")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="weights and activations (auto: bf16 on CUDA and on a CPU with AMX, fp32 on other CPUs "
                        "and for --impl triton on a CPU)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: weight-only int8 linear layers and LM head, per-channel scales "
                        "(CPU: about a quarter of fp32's bytes per token)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step; on CUDA it replays as a CUDA graph. Use it on a GPU for more "
                        "than ~100 tokens (compiling takes tens of seconds once); not on a CPU")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the eager decode step from a CUDA graph, captured once on the second token "
                        "(default on CUDA unless --compile; no compilation: milliseconds where --compile takes "
                        "tens of seconds). --no-cuda-graph launches every step from Python")
    p.add_argument("--impl", choices=("auto", "torch", "triton"), default="auto",
                   help="LayerNorm/attention implementation (auto: triton on CUDA, torch on CPU)")
    p.add_argument("--tokenizer", metavar="DIR", help="directory with vocab.json + merges.txt "
                   "(default: $GPT2_TOKENIZER_DIR, tiktoken's gpt2, then the Hugging Face hub)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.prompt = args.prompt or ["Once upon a time"]
    if "-" in args.prompt and len(args.prompt) > 1:
        parser.error("--prompt - reads every prompt from stdin: give no other --prompt")
    args.from_stdin = args.prompt == ["-"]
    return args


def prompt_groups(args):
    """The prompts to sample together: every --prompt at once, or with ``--prompt -`` each non-blank
    line of stdin as soon as it is read (typed, or piped from a file)."""
    if not args.from_stdin:
        yield args.prompt
        return
    for line in sys.stdin:
        if line.strip():
            yield [line.rstrip("\r\n")]


def load(args):
    """(decoder, tokenizer, device), or an exception with a one-line message."""
    import torch

    from gpt.checkpoint import load_model
    from gpt.generate import Decoder
    from gpt.hardware import default_dtype
    from gpt.tokenizer import get_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    if device.type == "cpu" and args.impl == "triton":  # triton is not imported yet: use its interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    tokenizer = get_tokenizer(args.tokenizer)
    if args.hf:
        from gpt.hf import load_pretrained

        model = load_pretrained(args.hf)
        model.impl = args.impl
    else:
        model = load_model(args.checkpoint, map_location="cpu", impl=args.impl)
    dtype = default_dtype(device, args.impl) if args.dtype == "auto" else args.dtype
    decoder = Decoder(model, device=device, dtype=dtype, quantize=None if args.quantize == "none" else args.quantize,
                      compile=args.compile, cuda_graph=args.cuda_graph)
    return decoder, tokenizer, device


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


SEPARATOR = "\n" + "-" * 40 + "\n"


def run(args) -> None:
    """Load, generate and print; problems with the input raise with a one-line message.

    Ctrl-C while sampling prints what was generated so far and raises ``Interrupted``.
    """
    import torch

    from gpt.generate import GenerationInterrupted, TextStream, generate

    decoder, tokenizer, device = load(args)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    eos_id=tokenizer.eos_id, generator=generator)
    ctx = decoder.model.config.max_seq_length
    rows = (f"{args.num_samples} for each line of stdin" if args.from_stdin
            else len(args.prompt) * args.num_samples)
    print(f"sample.py: sampling {rows} x {args.max_new_tokens} tokens ({device}, "
          f"{decoder.summary}, impl={args.impl})", file=sys.stderr, flush=True)
    if args.from_stdin and sys.stdin.isatty():  # someone typing: say that it waits, and for what
        print("sample.py: type a prompt and press Enter (Ctrl-D ends)", file=sys.stderr, flush=True)
    seconds, tokens, numbered = 0.0, 0, 0  # sampling time (not stdin's), new tokens, prompts so far
    outs = []  # the current group's samples (new tokens), printed as they end
    try:
        for group in prompt_groups(args):
            prompts = [p for p in group for _ in range(args.num_samples)]
            ids = [tokenizer.encode(p) for p in prompts]
            for i, row in enumerate(ids, start=numbered + 1):
                if len(row) > ctx:
                    print(f"sample.py: prompt {i} has {len(row)} tokens, more than the context of {ctx}: "
                          f"kept its last {ctx}", file=sys.stderr)
            numbered += len(prompts)
            t0 = time.perf_counter()
            if args.stream:  # one row at a time, text printed as soon as it decodes cleanly
                for prompt, row in zip(prompts, ids):
                    sys.stdout.write(prompt)
                    stream = TextStream(tokenizer, _write)

                    def on_token(tok, stream=stream):
                        if int(tok[0]) != tokenizer.eos_id:
                            stream.push(int(tok[0]))

                    try:
                        outs += generate(decoder, [row], args.max_new_tokens, **settings, on_token=on_token)
                    except GenerationInterrupted as e:
                        outs += e.tokens
                        raise
                    finally:
                        stream.flush()
                        sys.stdout.write(SEPARATOR)
            else:
                try:
                    outs = generate(decoder, ids, args.max_new_tokens, **settings)
                except GenerationInterrupted as e:
                    outs = e.tokens
                    raise
                finally:
                    for prompt, out in zip(prompts, outs):
                        sys.stdout.write(prompt + tokenizer.decode(out) + SEPARATOR)
                    sys.stdout.flush()  # (a line of stdin's samples, before the next line is read)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            tokens += sum(len(o) for o in outs)
            outs = []
    except KeyboardInterrupt as e:
        raise Interrupted(tokens + sum(len(o) for o in outs), _signal_of(e)) from None
    print(f"{tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s, {device}, "
          f"impl={args.impl})", file=sys.stderr)


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM: ``signum``) while sampling, after the text so far was printed."""

    def __init__(self, tokens: int, signum: int):
        super().__init__(f"interrupted after {tokens} new tokens")
        self.signum = signum


def _on_sigterm(signum, frame):
    """SIGTERM (``kill``, a scheduler) stops sampling as Ctrl-C does: the text so far is kept."""
    raise Terminated


class Terminated(KeyboardInterrupt):
    """SIGTERM while sampling: handled as Ctrl-C, with SIGTERM's exit code."""


def _signal_of(e: BaseException | None) -> int:
    """SIGTERM if a ``Terminated`` is ``e`` or behind it (``generate`` re-raises it as its own
    ``GenerationInterrupted``), else SIGINT."""
    while e is not None:
        if isinstance(e, Terminated):
            return signal.SIGTERM
        e = e.__context__
    return signal.SIGINT


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported only once the flags are valid: bad flags are answered without loading torch.
    from gpt.errors import UserError, one_line

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run(args)
    except BrokenPipeError:  # the reader went away (`sample.py | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 128 + signal.SIGPIPE
    except (UserError, ValueError, OSError, RuntimeError) as e:  # ours, and torch's / the OS's on bad input
        print(f"sample.py: error: {one_line(e)}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as e:  # Ctrl-C or SIGTERM: the text so far is on stdout already
        sys.stdout.flush()
        print(f"sample.py: {e if isinstance(e, Interrupted) else 'interrupted'}", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Interrupted) else _signal_of(e))  # 130 (Ctrl-C) or 143 (SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
