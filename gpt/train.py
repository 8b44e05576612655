"""The training command line: ``python train.py`` (or ``python -m gpt.train``); ``--help`` lists every flag.

Every ``GPTConfig``/``TrainConfig`` field is a flag (``--d-model``, ``--warmup-steps``...) overriding
the chosen preset; ``--preset NAME --help`` shows that preset's values and ``--show-config`` the
resolved configuration. Outputs in ``--out-dir``: ``gpt2_best_model.pt`` (best validation loss),
``last.pt`` (for ``--resume``), ``training_history.json`` and ``training_curves_with_accuracy.png``.

What happens to ``--out-dir``:

* it holds no run: a new run starts (``--resume auto`` too);
* it holds a run: without ``--resume`` or ``--overwrite`` the command refuses (one line, nothing
  touched); ``--resume`` (or ``--resume auto``) continues it from ``last.pt`` with its data,
  tokenizer, preset and overrides; ``--overwrite`` deletes its outputs and starts a new run.

A resumed run keeps its model, recipe, seed and data: a flag that contradicts them is an error, except
the ones in ``RESUME_MAY_CHANGE`` (how long it runs, how it runs, what it reports). ``--data`` and
``--tokenizer`` may point somewhere else if the content is the same (checked by hash).
The training itself is ``gpt.trainer``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import signal
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch.distributed as dist

from .checkpoint import load_checkpoint
from .config import PRESETS, WEIGHT_DECAY_ON, GPTConfig, TrainConfig, get_preset
from .errors import UserError
from .hardware import (CPU_DEFAULT_DTYPE, DTYPES, host_memory_capped, host_memory_kept, is_out_of_memory,
                       out_of_memory_line, tf32_matmuls)
from .ops import IMPLS, resolve_impl
from .step import merge_factor
from .trainer import (BEST_NAME, CURVES_NAME, HISTORY_NAME, LAST_NAME, RunOptions, TrainError, Trainer,
                      remove_run, run_files, tensorboard_writer_class)

DEFAULTS = RunOptions()
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # each stops the run at a step boundary with last.pt written
# Flags a resumed run may change: where and how it runs, how long, how often it reports and saves.
RESUME_MAY_CHANGE = frozenset({
    "out_dir", "cache_dir", "device", "impl", "dtype", "compile", "cuda_graph", "forward_tokens", "log_interval",
    "checkpoint_interval", "sample_length", "progress", "tensorboard", "max_steps", "epochs", "eval_interval",
    "eval_batch_size", "patience",
})
METAVARS = {int: "N", float: "X", str: "S"}
CONTENT_CHECKED = frozenset({"data", "tokenizer"})  # may move; the trainer checks the content is the same


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_comments(cls) -> dict[str, str]:
    """Each dataclass field's trailing ``# comment`` in its source: the one home of its description."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=#]+=[^#]*#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _preset_from_argv(argv: list[str]) -> str:
    """The --preset given on the command line (for --help's preset values), else the default."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=DEFAULTS.preset)
    name = pre.parse_known_args(argv)[0].preset
    return name if name in PRESETS else DEFAULTS.preset


def build_parser(preset: str = DEFAULTS.preset) -> argparse.ArgumentParser:
    """The parser; ``preset`` is whose values the help of the model and training flags shows.

    Every flag's default is None (= not given), so the command line knows what the user set: the
    preset's values (or, on --resume, the run's) fill the rest.
    """
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a GPT-2 on TinyStories. Preset values can be overridden by any flag below; "
                    "`train.py --preset NAME --help` shows that preset's values, --show-config the resolved ones.",
    )
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS),
                     help=f"model + recipe preset: 'seed' (the seed's recipe, for a GPU), 'tiny' (a CPU), 'gpt2' "
                          f"(default: {DEFAULTS.preset})")
    run.add_argument("--data", help="TinyStories .txt/.jsonl/.parquet file or directory (default: the Hugging Face "
                                    "hub's roneneldan/TinyStories)")
    run.add_argument("--tokenizer", help="GPT-2 tokenizer directory holding vocab.json + merges.txt (default: "
                                         "$GPT2_TOKENIZER_DIR, else tiktoken's gpt2, else the hub)")
    run.add_argument("--out-dir", help=f"the run's directory: checkpoints, history, curves (default: {DEFAULTS.out_dir})")
    run.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), metavar="auto",
                     help=f"continue the run in --out-dir from its {LAST_NAME}, with its data, tokenizer, preset and "
                          "overrides; 'auto': continue if there is one, else start one (for torchrun --max-restarts)")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir (its outputs "
                                                              "are deleted once the new run has started)")
    run.add_argument("--cache-dir", help=f"where tokenized splits are cached, shared with `python -m gpt.data` "
                                         f"(default: {DEFAULTS.cache_dir})")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    run.add_argument("--impl", choices=IMPLS, help=f"hot-op implementation; auto: triton on CUDA where the "
                                                   "kernels cover the model (head dim 16, 32, 64 or 128), "
                                                   f"torch elsewhere (default: {DEFAULTS.impl})")
    run.add_argument("--dtype", choices=sorted(DTYPES),
                     help=f"autocast dtype (default: bf16 on CUDA and on a CPU with AMX, {CPU_DEFAULT_DTYPE} on "
                          "other CPUs and for --impl triton on a CPU, whose interpreter has no bf16 dots)")
    run.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    run.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                     help="capture the training step in a CUDA graph after 3 eager steps, and the validation "
                          "and test forwards after one, and replay them: no per-kernel launch cost (CUDA, torchrun "
                          "too, bf16 or fp32, not with --compile; default: on where it can run, else off)")
    run.add_argument("--forward-tokens", type=int, metavar="N",
                     help="run a step's micro-batches merged into forwards of up to N tokens: the same sequences "
                          "and mean loss, so the same step, in fewer and larger kernels (the seed preset's 8 x 4 "
                          f"sequences as one forward of 32); 0: one forward per micro-batch (default: {DEFAULTS.forward_tokens})")
    run.add_argument("--seed", type=int, help=f"seed of the initial weights, data order and dropout (default: {DEFAULTS.seed})")
    run.add_argument("--log-interval", type=int, help="steps between reads of the training metrics (host "
                                                      f"syncs): the train loss is their mean (default: {DEFAULTS.log_interval})")
    run.add_argument("--checkpoint-interval", type=int,
                     help=f"steps between writes of {LAST_NAME}, which is also written at every evaluation, on "
                          f"Ctrl-C and at the end; 0: only then (default: {DEFAULTS.checkpoint_interval})")
    run.add_argument("--sample-length", type=int, help="tokens per generated sample at the end, prompt included "
                                                       f"(default: {DEFAULTS.sample_length})")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                     help="hide the progress bars (shown by default)")
    run.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard event files to DIR (needs the "
                                                          "optional tensorboard package)")
    run.add_argument("--init-from", metavar="SOURCE",
                     help="start a new run from these weights instead of random ones: one of our checkpoints "
                          f"(e.g. out/{BEST_NAME}), a transformers GPT-2 directory, or a Hugging Face hub name "
                          "(gpt2, gpt2-medium, ...; needs the network or transformers' cache). The model's sizes, "
                          "context and dropout come from it; --max-seq-length may shrink the context, --dropout and "
                          "--attn-dropout may change")
    run.add_argument("--show-config", action="store_true", help="print the resolved configuration and exit")
    values = get_preset(preset)
    for title, cls, chosen in (("model (GPTConfig)", GPTConfig, values.model), ("training (TrainConfig)", TrainConfig, values.train)):
        group = p.add_argument_group(f"{title}; values of preset {preset!r} shown")
        comments = field_comments(cls)
        for f in fields(cls):
            extra = {"choices": WEIGHT_DECAY_ON} if f.name == "weight_decay_on" else {}
            group.add_argument(_flag(f.name), type=type(f.default), dest=f.name, metavar=METAVARS[type(f.default)], **extra,
                               help=f"{comments.get(f.name, f.name)} (preset {preset}: {getattr(chosen, f.name)})")
    return p


def _given(ns: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(ns, f.name) for f in fields(cls) if getattr(ns, f.name, None) is not None}


def validate_train_config(tc: TrainConfig, world_size: int = 1) -> None:
    checks = [
        (tc.batch_size >= 1, f"--batch-size must be >= 1, got {tc.batch_size}"),
        (tc.grad_accum >= 1, f"--grad-accum must be >= 1, got {tc.grad_accum}"),
        (tc.lr > 0, f"--lr must be > 0, got {tc.lr}"),
        (0 <= tc.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {tc.min_lr_ratio}"),
        (tc.weight_decay >= 0, f"--weight-decay must be >= 0, got {tc.weight_decay}"),
        (tc.weight_decay_on in WEIGHT_DECAY_ON, f"--weight-decay-on must be one of {WEIGHT_DECAY_ON}, got {tc.weight_decay_on!r}"),
        (0 <= tc.beta1 < 1 and 0 <= tc.beta2 < 1, f"betas must be in [0, 1), got ({tc.beta1}, {tc.beta2})"),
        (tc.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {tc.grad_clip}"),
        (tc.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {tc.warmup_steps}"),
        (tc.max_steps >= 0, f"--max-steps must be >= 0, got {tc.max_steps}"),
        (tc.max_steps > 0 or tc.epochs > 0, "need --max-steps > 0 or --epochs > 0"),
        (tc.eval_interval >= 0, f"--eval-interval must be >= 0, got {tc.eval_interval}"),
        (tc.eval_tokens >= 0, f"--eval-tokens must be >= 0, got {tc.eval_tokens}"),
        (tc.eval_batch_size >= 0, f"--eval-batch-size must be >= 0 (0 = a step's sequences), got {tc.eval_batch_size}"),
        (tc.patience >= 0, f"--patience must be >= 0 (0 = never stop early), got {tc.patience}"),
        (tc.num_stories >= 0, f"--num-stories must be >= 0, got {tc.num_stories}"),
        (tc.grad_accum % world_size == 0,
         f"--grad-accum ({tc.grad_accum}) must be divisible by the number of processes ({world_size})"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TrainError(msg)


def _validate_run_options(opts: RunOptions) -> None:
    for name in ("log_interval", "sample_length"):
        if getattr(opts, name) < 1:
            raise TrainError(f"{_flag(name)} must be >= 1, got {getattr(opts, name)}")
    if opts.checkpoint_interval < 0:
        raise TrainError(f"--checkpoint-interval must be >= 0 (0 = at evaluations only), got {opts.checkpoint_interval}")
    if opts.forward_tokens < 0:
        raise TrainError(f"--forward-tokens must be >= 0 (0 = one forward per micro-batch), got {opts.forward_tokens}")


def _absolute(opts: RunOptions) -> RunOptions:
    """Paths a resumed run must find again from any working directory, made absolute (``init_from``
    where it names a local file or directory, not a hub model)."""
    paths = {k: str(Path(getattr(opts, k)).resolve()) for k in ("data", "tokenizer", "cache_dir")
             if getattr(opts, k) is not None}
    if opts.init_from is not None and Path(opts.init_from).expanduser().exists():
        paths["init_from"] = str(Path(opts.init_from).expanduser().resolve())
    return replace(opts, **paths)


# Model flags that may differ from an --init-from model's: they change no weight.
MAY_DIFFER_FROM_START = frozenset({"dropout", "attn_dropout"})


def _start_from(ns: argparse.Namespace, source: str) -> tuple[GPTConfig, dict]:
    """The model config and initial state dict of a run started from ``source`` (``--init-from``):
    the source's config, with the dropouts given on the command line and a context cut to
    ``--max-seq-length`` (the first rows of the position table); any other model flag must agree."""
    from .hf import load_pretrained

    start = load_pretrained(source)
    theirs = start.config
    given = _given(ns, GPTConfig)
    for name, value in given.items():
        shrinks = name == "max_seq_length" and value <= theirs.max_seq_length
        if name not in MAY_DIFFER_FROM_START and not shrinks and value != getattr(theirs, name):
            how = " (the context may only shrink)" if name == "max_seq_length" else ""
            raise TrainError(f"{_flag(name)} {value} contradicts the --init-from model ({name} {getattr(theirs, name)}): "
                             f"its architecture comes from {source}{how}")
    try:
        cfg = replace(theirs, **given)
    except (ValueError, TypeError) as e:
        raise TrainError(str(e)) from None
    weights = start.state_dict()
    weights["wpe.weight"] = weights["wpe.weight"][:cfg.max_seq_length].clone()  # positions past the context: unused
    return cfg, weights


def _new_run(ns: argparse.Namespace) -> tuple[RunOptions, GPTConfig, TrainConfig, dict | None]:
    """A new run's options and configs, and its initial weights (None: random)."""
    preset = get_preset(ns.preset or DEFAULTS.preset)
    opts = _absolute(replace(DEFAULTS, **_given(ns, RunOptions)))
    try:
        tc = replace(preset.train, **_given(ns, TrainConfig))
        if opts.init_from is None:
            return opts, replace(preset.model, **_given(ns, GPTConfig)), tc, None
    except (ValueError, TypeError) as e:
        raise TrainError(str(e)) from None
    cfg, weights = _start_from(ns, opts.init_from)
    return opts, cfg, tc, weights


def _resumed_run(ns: argparse.Namespace, ck: dict, last: Path) -> tuple[RunOptions, GPTConfig, TrainConfig]:
    """The run recorded in ``ck``, with the flags given on this command line checked against it."""
    if ns.init_from is not None:
        raise TrainError(f"--init-from sets a new run's starting weights; --resume continues the run in {last.parent} "
                         f"from its {LAST_NAME}")
    try:
        recorded = {f.name: ck["run_options"][f.name] for f in fields(RunOptions) if f.name in ck["run_options"]}
        opts = replace(DEFAULTS, **recorded)
        cfg = GPTConfig.from_dict(ck["config"])
        tc = TrainConfig(**ck["train_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"{last} does not record its run's settings ({e}); it cannot be resumed") from None
    changes = {}
    for cls, current in ((RunOptions, opts), (GPTConfig, cfg), (TrainConfig, tc)):
        for name, value in _given(ns, cls).items():
            if name in RESUME_MAY_CHANGE or name in CONTENT_CHECKED:
                changes.setdefault(cls, {})[name] = value
                continue
            theirs = getattr(current, name)
            if value != theirs:
                raise TrainError(
                    f"{_flag(name)} {value} contradicts the run in {last.parent} ({name} {theirs}): a resumed run keeps "
                    "its preset, seed, model, recipe and data; on --resume only --max-steps, --epochs, --eval-interval, "
                    "--patience and where/how it runs (--device, --dtype, --impl, ...) may change; start a new run "
                    "with another --out-dir")
    opts = _absolute(replace(opts, **changes.get(RunOptions, {})))
    tc = replace(tc, **changes.get(TrainConfig, {}))
    if opts.data is not None and not Path(opts.data).exists():
        raise TrainError(f"the run's data {opts.data} is gone; pass --data PATH to the same data where it is now")
    return opts, cfg, tc


def _plan(ns: argparse.Namespace) -> tuple[dict | None, Path]:
    """What to do with --out-dir: the checkpoint to resume (None: a new run), or a one-line refusal."""
    out = Path(ns.out_dir or DEFAULTS.out_dir)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out-dir {out} is a file, not a directory")
    last = out / LAST_NAME
    existing = run_files(out)
    if ns.resume and ns.overwrite:
        raise TrainError("--resume continues the run in --out-dir and --overwrite replaces it: choose one")
    resume = ns.resume == "yes" or (ns.resume == "auto" and last.exists())
    if resume:
        if not last.exists():
            held = f" (it holds {', '.join(p.name for p in existing)} but no {LAST_NAME})" if existing else ""
            raise TrainError(f"--resume: no run to continue in {out}{held}; start one without --resume")
        ck = load_checkpoint(last)
        if "optimizer" not in ck or "step" not in ck:
            raise TrainError(f"--resume: {last} is a model-only checkpoint, not a resumable one")
        return ck, out
    if existing and not ns.overwrite and not ns.show_config:
        if last.exists():
            raise TrainError(f"{out} already holds a run (step {_step_of(last)}): continue it with --resume, replace "
                             "it with --overwrite, or choose another --out-dir")
        raise TrainError(f"{out} already holds a run's outputs ({', '.join(p.name for p in existing)}) but no "
                         f"{LAST_NAME} to continue from: replace them with --overwrite, or choose another --out-dir")
    return None, out


def _check_writable(directory: Path, flag: str) -> None:
    """A TrainError unless ``directory`` is, or can be made as, a directory this process may write in."""
    existing = directory
    while not existing.exists() and existing != existing.parent:  # the nearest ancestor that exists
        existing = existing.parent
    if not existing.is_dir():
        raise TrainError(f"cannot create {flag} {directory}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(f"cannot write {flag} {directory}: no write permission in {existing}")


def _step_of(last: Path):
    try:
        return load_checkpoint(last).get("step", "?")
    except UserError:
        return "? (unreadable last.pt)"


def _show_config(opts: RunOptions, cfg: GPTConfig, tc: TrainConfig, resumed: Path | None) -> None:
    print(f"# {'the run in ' + str(resumed) if resumed else 'a new run'}; preset {opts.preset}")
    for title, obj in (("run", opts), ("model", cfg), ("training", tc)):
        print(f"[{title}]")
        for k, v in asdict(obj).items():
            print(f"{_flag(k)} {v}")


def _start_line(trainer: Trainer, resumed: bool, flags: list[str]) -> str:
    opts, tc, cfg = trainer.opts, trainer.tc, trainer.model_cfg
    steps = f"{trainer.max_steps:,} steps"
    if not tc.max_steps:
        steps += f" (--max-steps 0: {tc.epochs:g} epochs of {len(trainer.splits.train):,} train tokens)"
    saves = f"{LAST_NAME} every {opts.checkpoint_interval} steps and " if opts.checkpoint_interval else f"{LAST_NAME} "
    k = merge_factor(trainer.accum, tc.batch_size * cfg.max_seq_length, opts.forward_tokens)
    merged = "" if k == 1 else f", run as {trainer.accum // k} x {k * tc.batch_size} seqs a process"
    evals = f"every {tc.eval_interval} steps" if tc.eval_interval else "at the end"
    evals += f" ({trainer.eval_batch} seqs a forward)"
    where = (f"resuming at step {trainer.state.step} of {trainer.out / LAST_NAME}" if resumed
             else f"new run in {trainer.out}" + (f", starting from {opts.init_from}" if opts.init_from else ""))
    if resumed:
        settings = "the run's settings" + (f"; from this command: {' '.join(flags)}" if flags else "")
    else:
        settings = f"{len(flags)} override{'s' * (len(flags) != 1)}" if flags else "no overrides"
    return (f"train: preset {opts.preset} ({settings}) | "
            f"{trainer.raw.num_params() / 1e6:.2f}M parameters | {trainer.tokens_per_step:,} tokens/step "
            f"({tc.batch_size} seqs x {cfg.max_seq_length} tokens x {tc.grad_accum} accumulation{merged}) | {steps} | "
            f"{trainer.device} {trainer.dtype}, impl {resolve_impl(opts.impl, trainer.device, cfg)}"
            f"{', CUDA graph' if trainer.cuda_graph else ''}, {trainer.world} process(es) | validation {evals}, {saves}at each validation | {where}")


def _report(trainer: Trainer, result: dict) -> None:
    seed = result["seed_protocol_test"]
    seed_text = (f"perplexity {seed['perplexity']:.2f}, accuracy {100 * seed['accuracy']:.1f}% over {seed['rows']:,} stories"
                 if seed["perplexity"] is not None else f"not computed: {seed['reason']}")
    print(f"test perplexity {result['final_perplexity']:.2f} | test accuracy {100 * result['test_accuracy']:.1f}% "
          f"(every real token of the test split, {result['test_tokens']:,})")
    print(f"test by the seed's protocol (stories padded to 256 with EOS, pads counted): {seed_text}")
    print(f"{result['tokens_per_sec']:,.0f} tokens/s steady ({result['tokens_per_sec_measured_over']}); "
          f"{result['tokens_per_sec_with_startup']:,.0f} with start-up | outputs in {trainer.out}: {BEST_NAME}, "
          f"{LAST_NAME}, {HISTORY_NAME}, {CURVES_NAME}")
    print(f"samples from the best checkpoint ({trainer.opts.sample_length} tokens at most):")
    for prompt, text in result["generated_texts"].items():
        print(f"--- {prompt!r}\n{text}")


def run(ns: argparse.Namespace) -> int:
    ck, out = _plan(ns)
    start_weights = None
    if ck is None:
        opts, model_cfg, tc, start_weights = _new_run(ns)
    else:  # the run continues where its checkpoint was found, whatever directory it was started in
        opts, model_cfg, tc = _resumed_run(ns, ck, out / LAST_NAME)
        opts = replace(opts, out_dir=str(out))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _validate_run_options(opts)
    validate_train_config(tc, world)
    if ns.show_config:
        _show_config(opts, model_cfg, tc, out if ck is not None else None)
        return 0
    if ck is not None and ck.get("world_size", 1) != world:
        raise TrainError(f"--resume: the checkpoint was written by {ck.get('world_size')} processes, this run has {world}")
    _check_writable(out, "--out-dir")  # fail now, not after the data is ready
    if opts.tensorboard:
        tensorboard_writer_class()
        _check_writable(Path(opts.tensorboard), "--tensorboard")
    trainer = Trainer(opts, model_cfg, tc, start_weights)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine
    with tf32_matmuls(trainer.device), host_memory_kept(trainer.device), host_memory_capped(trainer.device, ranks_here):
        return _train(trainer, ck, ns, out)


def _train(trainer: Trainer, ck: dict | None, ns: argparse.Namespace, out: Path) -> int:
    """Set up, train, test and report; the exit code (Ctrl-C and SIGTERM: 128 + the signal)."""
    trainer.setup(ck)
    # Ctrl-C or SIGTERM: stop at a step boundary and save; twice: now
    previous = {sig: signal.signal(sig, trainer.on_stop_signal) for sig in STOP_SIGNALS}
    try:
        if trainer.master:
            if ns.overwrite:
                remove_run(out)
            out.mkdir(parents=True, exist_ok=True)
            flags = [_flag(k) for cls in (GPTConfig, TrainConfig) for k in _given(ns, cls)
                     if ck is None or k in RESUME_MAY_CHANGE]
            print(_start_line(trainer, ck is not None, flags), flush=True)
        reason = trainer.train()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if reason in ("interrupted", "stopped_now"):
        if trainer.master:
            st = trainer.state.step
            saved = (f"saved {trainer.out / LAST_NAME}" if reason == "interrupted" or trainer.world == 1
                     else f"{trainer.out / LAST_NAME} holds the last checkpoint written")
            how = "at the end of a step" if reason == "interrupted" else "now, the step in progress dropped"
            print(f"interrupted at step {st} ({how}): {saved}; continue with --resume --out-dir {trainer.out}",
                  file=sys.stderr)
        return 128 + (trainer.stop_signal or signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM, as the shell reports them
    try:
        result = trainer.finish()
    except KeyboardInterrupt:
        if trainer.master:
            print(f"interrupted during the final test pass: training is complete in {trainer.out / LAST_NAME}; "
                  f"--resume --out-dir {trainer.out} redoes the test pass and samples", file=sys.stderr)
        return 130
    if trainer.master:
        _report(trainer, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = build_parser(_preset_from_argv(argv)).parse_args(argv)
    try:
        return run(ns)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        print(f"error: {out_of_memory_line(e)}: lower --batch-size, --forward-tokens (0: one forward per "
              f"micro-batch) or --eval-batch-size; the checkpoints already written are kept (--resume "
              f"continues from {LAST_NAME})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Exit with ``code``. A torchrun worker (its output written, its process group destroyed)
    skips the interpreter's finalization, where gloo's worker threads can still free tensors and
    abort the process (the mechanism pytorch/pytorch#179291 describes; seen here in ~1 restarted
    run in 10), which torchrun would take for a failure and restart."""
    if dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
