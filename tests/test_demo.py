"""The README's first command: `base-plugin demo`, at a tiny scale (2 CPU ranks, a few steps)."""
import json
import multiprocessing

import pytest

from base_plugin.demo import main
from base_plugin.demo.train import train
from multirank import run_ranks

TINY = ["--ranks", "2", "--experts", "4", "--steps", "6", "--eval-every", "3", "--d-model", "32", "--layers", "3",
        "--batch", "2", "--seq-len", "32", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(TINY + ["--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_outputs_exist(demo_run):
    out, metrics = demo_run
    assert [r["variant"] for r in metrics["runs"]] == ["dense", "top1", "top2", "base"]
    for name in ("validation_loss.png", "expert_load.png", "base_gate.png"):
        assert (out / name).stat().st_size > 1000
    for variant in ("dense", "top1", "top2", "base"):
        assert list((out / "tensorboard" / variant).glob("events.out.tfevents.*"))
        assert (out / "checkpoints" / variant / "latest").read_text().strip() == "step6"
    for run in metrics["runs"]:
        assert len(run["train_loss"]) == 6 and run["val_step"] == [3, 6]
        assert all(loss == loss and loss < 6.0 for loss in run["val_loss"])  # finite, below ln(256) ~ 5.55 + slack


def test_base_is_exactly_balanced_and_drops_nothing(demo_run):
    _, metrics = demo_run
    base = next(r for r in metrics["runs"] if r["variant"] == "base")
    assert base["load_max_over_mean"] == [1.0] * 6
    assert base["dropped_fraction"] == [0.0] * 6
    # every expert got exactly its share of the 2 ranks x 2 x 32 tokens on every step
    assert all(counts == [32.0] * 4 for counts in base["tokens_per_expert"])
    assert all(0.0 < g < 1.0 for g in base["mean_gate"])


def test_deterministic_for_a_seed(tmp_path):
    runs = []
    for name in ("a", "b"):
        main(TINY + ["--variants", "top1", "--out", str(tmp_path / name)])
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text())["runs"][0])
    assert runs[0]["train_loss"] == runs[1]["train_loss"]
    assert runs[0]["val_loss"] == runs[1]["val_loss"]


def test_stop_event_checkpoints_at_the_same_step(tmp_path):
    # what Ctrl-C does: the parent sets the event; every rank stops after the same step and checkpoints
    stop = multiprocessing.get_context("spawn").Event()
    stop.set()
    run = dict(variant="dense", steps=6, batch=2, lr=1e-3, seed=0, warmup=1, data=None, out=str(tmp_path),
               eval_every=3, eval_batches=1, base_layer={},
               model=dict(seq_len=32, d_model=32, n_layers=3, n_heads=4, ffn=128, num_experts=4, ep_size=2))
    result = run_ranks(train, 2, run, stop, timeout=300, stop_event=stop)[0]
    assert result["interrupted"] and result["step"] == [1] and result["val_step"] == [1]
    assert (tmp_path / "checkpoints" / "dense" / "latest").read_text().strip() == "step1"


@pytest.mark.parametrize("argv,message", [
    (["--experts", "5", "--ranks", "2"], "divisible"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--data", "/nonexistent/file.txt", "--steps", "1"], "no such file"),
])
def test_bad_arguments(argv, message, capsys, tmp_path):
    with pytest.raises((SystemExit, ValueError)) as err:
        main(argv + ["--out", str(tmp_path)])
    assert message in (str(err.value) + capsys.readouterr().err)
