"""Checkpointed training: every epoch's full state, exact resume, run signatures, Ctrl-C."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from genedml_sd.model import GeneDMLConfig, SlideTensors, TrainArgs, train_method

CPU = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def slides(seed: int = 0, n: int = 96) -> list[SlideTensors]:
    rng = np.random.default_rng(seed)
    w_img, w_gene = rng.normal(size=(4, 12)), rng.normal(size=(4, 7))
    out = []
    for i in range(3):
        z = rng.normal(size=(n, 4))
        local = z @ w_img + 0.1 * rng.normal(size=(n, 12))
        nb = local[:, None] + 0.3 * rng.normal(size=(n, 25, 12))
        out.append(SlideTensors.from_numpy(local, rng.uniform(0, 3000, (n, 2)), nb, z @ w_gene, f"s{i}"))
    return out


# lr decays every epoch (scheduler state), dropout + in-batch k-means draw random numbers (RNG state)
CFG = GeneDMLConfig(
    enc_dim=12, n_genes=7, dim=32, n_heads=4, gene_hidden=16, group_dim=8, k=3, lr=3e-3, step_size=1, gamma=0.7
)
KW = {"batch_size": 48, "seed": 1, "patience": 20, **CPU}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("validate", [True, False])
def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, validate):
    *train, v = slides()
    val = [v] if validate else None
    full = train_method("gene-dml", train, val, CFG, TrainArgs(max_epochs=5, **KW))
    d = tmp_path / "run"
    part = train_method("gene-dml", train, val, CFG, TrainArgs(max_epochs=2, checkpoint_dir=d, **KW))
    assert len(part.history) == 2
    files = {p.name for p in d.iterdir()}
    assert {"last.ckpt", "run.json"} <= files and (any(f.startswith("best-epoch=") for f in files) == validate)
    resumed = train_method("gene-dml", train, val, CFG, TrainArgs(max_epochs=5, checkpoint_dir=d, resume=True, **KW))
    assert resumed.history == full.history  # exact: losses, val/pcc, lr schedule
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3, 4]
    assert resumed.best_epoch == full.best_epoch
    assert _same_weights(resumed.module, full.module)
    # resuming a finished run trains nothing more and returns the same model
    again = train_method("gene-dml", train, val, CFG, TrainArgs(max_epochs=5, checkpoint_dir=d, resume=True, **KW))
    assert again.history == full.history and again.best_epoch == full.best_epoch
    assert _same_weights(again.module, full.module)


def test_last_checkpoint_holds_the_full_state(tmp_path):
    *train, v = slides()
    d = tmp_path / "run"
    res = train_method("gene-dml", train, [v], CFG, TrainArgs(max_epochs=3, checkpoint_dir=d, **KW))
    ckpt = torch.load(d / "last.ckpt", map_location="cpu", weights_only=True)  # plain tensors and lists only
    assert ckpt["epoch"] == 2 and len(ckpt["optimizer_states"]) == 1 and len(ckpt["lr_schedulers"]) == 1
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 3  # stepped after each of the 3 epochs
    state = ckpt["genedml_sd"]
    assert state["history"] == res.history
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    weights = {k.removeprefix("module."): t for k, t in ckpt["state_dict"].items()}
    assert weights.keys() == res.module.state_dict().keys()
    run = json.loads((d / "run.json").read_text())
    assert (run["method"], run["seed"], run["batch_size"]) == ("gene-dml", 1, 48)
    assert run["config"] == json.loads(json.dumps(CFG.for_training(train).to_dict()))  # with the bank's size
    assert [s["name"] for s in run["train"]] == ["s0", "s1"] and [s["name"] for s in run["val"]] == ["s2"]
    assert run["train"][0]["shapes"] == {
        "local": [96, 12],
        "coords": [96, 2],
        "expr": [96, 7],
        "neighbour": [96, 25, 12],
    }
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_resume_refuses_another_run(tmp_path, caplog):
    *train, v = slides()
    d = tmp_path / "run"
    train_method("gene-dml", train, [v], CFG, TrainArgs(max_epochs=1, checkpoint_dir=d, **KW))

    def resume(tr=train, cfg=CFG, **kw):
        args = {**KW, **kw}
        return train_method("gene-dml", tr, [v], cfg, TrainArgs(max_epochs=2, checkpoint_dir=d, resume=True, **args))

    with pytest.raises(ValueError, match=r"different run \(seed 1 \(checkpoint\) != 2 \(now\)\)"):
        resume(seed=2)
    with pytest.raises(ValueError, match=r"config\.lr 0\.003 \(checkpoint\) != 0\.001 \(now\)"):
        resume(cfg=CFG.replace(lr=1e-3))
    changed = SlideTensors(train[0].local + 1.0, train[0].coords, train[0].neighbour, train[0].expr, "s0")
    with pytest.raises(ValueError, match=r"training slide 's0': checksum of \['local'\] differ"):
        resume(tr=[changed, train[1]])
    with pytest.raises(ValueError, match=r"training slides \['s0', 's1'\] \(checkpoint\) != \['s1', 's0'\]"):
        resume(tr=[train[1], train[0]])
    with pytest.raises(ValueError, match="batch_size 48"):
        resume(batch_size=32)
    with pytest.raises(ValueError, match=r"mix_slides False \(checkpoint\) != True \(now\)"):
        resume(mix_slides=True)
    (d / "run.json").unlink()
    with pytest.raises(ValueError, match="run.json is missing"):
        resume()
    # an empty folder: a warning, then training from scratch
    with caplog.at_level(logging.WARNING, logger="genedml_sd"):
        res = train_method(
            "gene-dml", train, None, CFG, TrainArgs(max_epochs=1, checkpoint_dir=tmp_path / "new", resume=True, **KW)
        )
    assert "starts from scratch" in caplog.text and len(res.history) == 1
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        TrainArgs(resume=True)


def test_sigint_in_process_raises_keyboard_interrupt_and_restores_the_handler(tmp_path):
    import lightning.pytorch as pl

    class CtrlC(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                os.kill(os.getpid(), signal.SIGINT)

    *train, v = slides()
    d = tmp_path / "run"
    previous = signal.getsignal(signal.SIGINT)
    args = TrainArgs(max_epochs=50, checkpoint_dir=d, trainer_kwargs={"callbacks": [CtrlC()]}, **KW)
    with pytest.raises(KeyboardInterrupt, match="interrupted"):
        train_method("gene-dml", train, [v], CFG, args)
    assert signal.getsignal(signal.SIGINT) is previous  # not left ignored (Lightning's own handling does that)
    ckpt = torch.load(d / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and len(ckpt["genedml_sd"]["history"]) == 1  # the last complete epoch
    # and the interrupted run resumes to the uninterrupted result
    full = train_method("gene-dml", train, [v], CFG, TrainArgs(max_epochs=3, **KW))
    resumed = train_method("gene-dml", train, [v], CFG, TrainArgs(max_epochs=3, checkpoint_dir=d, resume=True, **KW))
    assert resumed.history == full.history and _same_weights(resumed.module, full.module)


SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from genedml_sd.model import GeneDMLConfig, SlideTensors, TrainArgs, train_method

    rng = np.random.default_rng(0)
    s = [
        SlideTensors.from_numpy(
            rng.normal(size=(150, 16)), rng.uniform(0, 4000, (150, 2)), rng.normal(size=(150, 25, 16)),
            rng.normal(size=(150, 8)), f"s{i}",
        )
        for i in range(2)
    ]
    cfg = GeneDMLConfig(enc_dim=16, n_genes=8, dim=32, n_heads=4, gene_hidden=16, group_dim=8, k=3)
    args = TrainArgs(max_epochs=100000, batch_size=64, checkpoint_dir=sys.argv[1], accelerator="cpu", devices=1)
    train_method("gene-dml", s[:1], s[1:], cfg, args)
    print("finished")
    """
)


@pytest.mark.timeout(300)
def test_ctrl_c_stops_a_training_process_within_seconds(tmp_path):
    d = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        t0 = time.monotonic()
        while not (d / "last.ckpt").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() - t0 < 240, "no checkpoint written"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert elapsed < 15, elapsed
    assert proc.returncode != 0 and "finished" not in out
    assert "KeyboardInterrupt" in err, err[-2000:]
    ckpt = torch.load(d / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] >= 0 and len(ckpt["genedml_sd"]["history"]) == ckpt["epoch"] + 1


def test_training_again_in_the_same_folder_starts_over(tmp_path, caplog):
    # regression: a second run in a folder holding best-epoch=<k>.ckpt wrote best-epoch=<k>-v1.ckpt, whose
    # epoch could not be read back (ValueError); now the folder is reused with a warning
    *train, v = slides()
    d = tmp_path / "run"
    first = train_method("gene-dml", train, [v], CFG, TrainArgs(max_epochs=2, checkpoint_dir=d, **KW))
    with caplog.at_level(logging.WARNING, logger="genedml_sd"):
        second = train_method("gene-dml", train, [v], CFG, TrainArgs(max_epochs=2, checkpoint_dir=d, **KW))
    assert "will be overwritten" in caplog.text
    assert second.history == first.history and second.best_epoch == first.best_epoch
    assert _same_weights(second.module, first.module)
    assert len(torch.load(d / "last.ckpt", weights_only=True)["genedml_sd"]["history"]) == 2
