"""train.py --init-from: a new run starting from given weights -- one of our checkpoints, a
transformers GPT-2 directory (a hub name goes the same way through transformers) -- instead of
random ones; the model's sizes come from the source, the context may shrink, the dropouts change.

Each run takes one step at lr 1e-12 (AdamW moves a weight by about the lr), so its last.pt holds the
weights it started from: they must be the source's (the position table cut to the run's context).
"""

import pytest
import torch

from gpt import GPTConfig
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.hf import export_hf
from gpt.train import main
from gpt.trainer import LAST_NAME

from conftest import perturbed_model

# base_args' model (1 layer, d_model 32, 2 heads, d_ff 64) with twice its context of 32
SOURCE = GPTConfig(max_seq_length=64, num_layers=1, num_heads=2, d_model=32, d_ff=64, dropout=0.05)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(model, our checkpoint of it, a transformers directory of it)."""
    where = tmp_path_factory.mktemp("init_source")
    model = perturbed_model(SOURCE, device="cpu", seed=5)
    save_checkpoint({"model_state_dict": model.state_dict(), "config": SOURCE.to_dict()}, where / "source.pt")
    export_hf(model, where / "hf")
    return model, where / "source.pt", where / "hf"


def run(base_args, capsys, *extra):
    rc = main([*base_args, "--max-steps", "1", "--lr", "1e-12", "--eval-interval", "0", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("kind", ["checkpoint", "transformers"])
def test_a_run_starts_from_the_sources_weights(base_args, tmp_path, capsys, history, source, kind):
    model, ckpt, hf_dir = source
    start = ckpt if kind == "checkpoint" else hf_dir
    out = tmp_path / "run"
    rc, stdout, err = run(base_args, capsys, "--init-from", str(start), "--dropout", "0", "--out-dir", str(out))
    assert rc == 0, err
    assert f"new run in {out}, starting from {start}" in stdout.splitlines()[0]
    ck = load_checkpoint(out / LAST_NAME)
    assert GPTConfig.from_dict(ck["config"]) == GPTConfig(**{**SOURCE.to_dict(), "max_seq_length": 32, "dropout": 0.0})
    want = model.state_dict()
    want["wpe.weight"] = want["wpe.weight"][:32]  # the run's context of 32: the first rows
    got = ck["model_state_dict"]
    assert got.keys() == want.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=1e-6, rtol=0, msg=name)
    assert history(out)["run_options"]["init_from"] == str(start)


def test_a_random_start_is_not_the_source(base_args, tmp_path, capsys, source):
    """What the comparison above would see without --init-from: other weights."""
    model, _, _ = source
    rc, _, err = run(base_args, capsys, "--out-dir", str(tmp_path / "run"))
    assert rc == 0, err
    got = load_checkpoint(tmp_path / "run" / LAST_NAME)["model_state_dict"]
    assert not torch.allclose(got["wte.weight"], model.state_dict()["wte.weight"], atol=1e-3)


def test_resuming_a_started_run_keeps_its_weights_and_refuses_another_start(base_args, tmp_path, capsys, source):
    _, ckpt, _ = source
    out = tmp_path / "run"
    assert run(base_args, capsys, "--init-from", str(ckpt), "--out-dir", str(out))[0] == 0
    rc, _, err = run([], capsys, "--resume", "--out-dir", str(out), "--init-from", str(ckpt))
    assert rc == 1
    assert err.strip() == (f"error: --init-from sets a new run's starting weights; --resume continues the run in {out} "
                           f"from its {LAST_NAME}")
    assert main(["--resume", "--out-dir", str(out), "--max-steps", "2", "--no-progress"]) == 0, capsys.readouterr().err
    assert load_checkpoint(out / LAST_NAME)["step"] == 2


@pytest.mark.parametrize("extra,message", [
    (["--d-model", "64"], "--d-model 64 contradicts the --init-from model (d_model 32): its architecture comes from {src}"),
    (["--max-seq-length", "65"], "--max-seq-length 65 contradicts the --init-from model (max_seq_length 64): its "
                                 "architecture comes from {src} (the context may only shrink)"),
])
def test_a_model_flag_that_contradicts_the_source_is_one_line(base_args, tmp_path, capsys, source, extra, message):
    _, ckpt, _ = source
    out = tmp_path / "run"
    rc, _, err = run(base_args, capsys, "--init-from", str(ckpt), *extra, "--out-dir", str(out))
    assert rc == 1
    assert err.strip() == "error: " + message.format(src=ckpt)
    assert not out.exists()


def test_a_source_that_is_not_there_is_one_line(base_args, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for start, message in ((tmp_path / "missing.pt", "{src}: no such checkpoint file or model directory"),
                           (tmp_path / "empty", "{src} has no config.json: not a transformers model directory")):
        rc, _, err = run(base_args, capsys, "--init-from", str(start), "--out-dir", str(tmp_path / "run"))
        assert rc == 1
        assert err.strip() == "error: " + message.format(src=start)



def test_a_hub_model_without_the_hub_is_one_line_in_seconds(base_args, tmp_path, capsys, monkeypatch):
    """A hub name when the hub does not answer (the probe stubbed): transformers' cache only, and
    with no cached copy one line, not transformers' ~30 s of retries."""
    import gpt.hf

    monkeypatch.setattr(gpt.hf, "hub_unreachable", lambda: "https://huggingface.co: stubbed, no network")
    name = "tinygpt-kit-test/no-such-model"
    rc, _, err = run(base_args, capsys, "--init-from", name, "--out-dir", str(tmp_path / "run"))
    assert rc == 1
    assert err.strip() == (f"error: cannot load {name} from the Hugging Face hub, which does not answer "
                           "(https://huggingface.co: stubbed, no network), and transformers has no cached copy: pass a "
                           "checkpoint file or a model directory")
