"""Watching a run: tensorboard and wandb (offline) read back, held-out metrics equal to
evaluate.py's, best/ = the best held-out evaluation, the hacking check, --plot, a quiet command
line."""
import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import cold_start
import common
import evaluate
import opd
import rewards
import teacher_grpo
from conftest import ROOT, write_distill_world

METRICS = "ocr=fake_ocr,pickscore=fake_pickscore,deqa=fake_deqa"
HELDOUT = ["--eval-metrics", METRICS, "--eval-steps", "2"]


def colour(c, scale):
    return lambda images, prompts, metadata: scale * images[..., c].mean(axis=(1, 2)) / 255


@pytest.fixture
def fakes(monkeypatch):
    """Quick deterministic metrics from the image colours (the real ones need servers or OCR)."""
    fakes = {"fake_ocr": colour(0, 1.0), "fake_pickscore": colour(1, 1.0),
             "fake_deqa": colour(2, 5.0)}
    for name, fn in fakes.items():
        monkeypatch.setitem(rewards.REWARDS, name, lambda fn=fn: fn)


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    return write_distill_world(tiny_model, tmp_path_factory.mktemp("watching"))


def grpo(tiny_model, world, out, *extra):
    teacher_grpo.main(teacher_grpo.parse_args([
        "--model", tiny_model, "--data-root", str(world / "data"), "--out", str(out), "--tasks",
        "ocr", "--reward", "jpeg", "--batch-size", "2", "--group-size", "4", "--steps", "3",
        "--micro-batch", "4", "--save-every", "1", "--eval-every", "1", "--max-steps", "2",
        *extra]))


def rows(path):
    return [json.loads(line) for line in open(path)]


def lora(path):
    return common.read_lora(str(path))[0]


def wandb_history(out):
    """{run id: [history rows]} of the offline W&B runs under <out>/wandb, read from the run files
    (LevelDB log records of wandb's protobuf Record, after a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))):
        data, pos, records, part = open(path, "rb").read(), 7, [], b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            part = chunk if kind in (1, 2) else part + chunk  # FULL, FIRST / MIDDLE, LAST
            if kind in (1, 4):
                records.append(wandb_internal_pb2.Record.FromString(part))
        kinds = [r.WhichOneof("record_type") for r in records]
        run_id = next(r.run.run_id for r, k in zip(records, kinds) if k == "run")
        runs.setdefault(run_id, []).extend(
            {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r, k in zip(records, kinds) if k == "history")
    return runs


def test_tensorboard_and_wandb_get_every_step_and_a_resume_continues_the_run(
        tiny_model, world, tmp_path, fakes, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    flags = ["--report-to", "tensorboard,wandb", "--eval-prompts", "2", *HELDOUT]
    grpo(tiny_model, world, tmp_path, *flags)
    grpo(tiny_model, world, tmp_path, *flags, "--max-steps", "3", "--resume", "auto")
    logged = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == [0, 1, 2]
    keys = ["loss", "reward_mean", "kl", "heldout/ocr", "heldout/deqa", "heldout/average"]

    events = EventAccumulator(str(tmp_path / "tensorboard"), {"scalars": 0, "images": 0})
    events.Reload()
    for key in keys:
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [0, 1, 2], key
        expected = [r[key] for r in logged]
        assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6, abs=1e-12), key
    assert [i.step for i in events.Images("grid")] == [0, 1, 2]

    (run_id, history), = wandb_history(tmp_path).items()  # one run id for both processes
    assert run_id == (tmp_path / "wandb-run-id").read_text()
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))) == 2
    scalars = [h for h in history if "loss" in h]
    assert [h["_step"] for h in scalars] == [0, 1, 2]
    for key in keys:
        assert [h[key] for h in scalars] == pytest.approx([r[key] for r in logged], rel=1e-12), key
    images = [h["_step"] for h in history if h.get("grid/_type") == "image-file"]
    assert images == [0, 1, 2]

    grpo(tiny_model, world, tmp_path, *flags, "--max-steps", "1")  # a fresh run into the folder
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [0]
    assert len(wandb_history(tmp_path)) == 2  # a new W&B run
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("loss")] == [0]  # the old run's events are purged


def test_heldout_metrics_are_evaluate_pys_numbers_and_best_is_the_best_evaluation(
        tiny_model, world, tmp_path, fakes, capsys):
    run = tmp_path / "run"
    grpo(tiny_model, world, run, "--max-steps", "3", "--eval-prompts", "2", *HELDOUT,
         "--select-by", "ocr")
    logged = rows(run / "metrics.jsonl")
    for step in range(3):  # each step's checkpoint, scored by evaluate.py: same prompts and noise
        table = evaluate.main(evaluate.parse_args([
            "--model", tiny_model, "--data-root", str(world / "data"), "--tasks", "ocr", "--limit",
            "2", "--steps", "2", "--adapters", str(run / f"checkpoint-{step}"), "--metrics",
            "ocr=fake_ocr,deqa=fake_deqa", "--batch-size", "4", "--out", str(tmp_path / "eval"),
            "--name", f"step-{step}", "--grid", "0"]))
        held = logged[step]
        assert held["heldout/ocr"] == pytest.approx(table["ocr"], rel=1e-6)
        assert held["heldout/deqa"] == pytest.approx(table["deqa"], rel=1e-6)
        assert held["heldout/deqa_se"] == pytest.approx(table["stderr"]["deqa"], rel=1e-5)
        average = (table["ocr"] + table["deqa"] / 5) / 2  # the paper's, over the two columns
        assert held["heldout/average"] == pytest.approx(average, rel=1e-6)
    best = max(range(3), key=lambda s: logged[s]["heldout/ocr"])
    assert json.loads((run / "best" / "best.json").read_text())["step"] == best
    held_best, saved = lora(run / "best"), lora(run / f"checkpoint-{best}")
    assert all(torch.equal(held_best[k], saved[k]) for k in saved)
    assert [r["step"] for r in rows(run / "heldout.jsonl")] == [0, 1, 2]
    assert f"{run / 'best'}/ (step {best}, heldout/ocr " in capsys.readouterr().out


def test_heldout_evaluation_and_loggers_leave_training_unchanged(tiny_model, world, tmp_path,
                                                                 fakes, offline_wandb):
    grpo(tiny_model, world, tmp_path / "plain")
    grpo(tiny_model, world, tmp_path / "watched", "--eval-prompts", "2", *HELDOUT,
         "--report-to", "tensorboard,wandb")
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_time") and "heldout" not in k}
    assert [strip(r) for r in rows(tmp_path / "plain" / "metrics.jsonl")] == \
        [strip(r) for r in rows(tmp_path / "watched" / "metrics.jsonl")]
    a, b = lora(tmp_path / "plain" / "final"), lora(tmp_path / "watched" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_opd_evaluates_every_task_and_sft_reports_its_loss(tiny_model, world, tmp_path, fakes):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    teachers = f"ocr={world / 'ocr'},pickscore={world / 'pickscore'}"
    opd.main(opd.parse_args([
        "--model", tiny_model, "--data-root", str(world / "data"), "--out", str(tmp_path / "opd"),
        "--teachers", teachers, "--mar-teacher", str(world / "anchor"), "--init", "none",
        "--batch-size", "2", "--group-size", "2", "--steps", "3", "--micro-batch", "4",
        "--max-steps", "2", "--eval-every", "2", "--eval-prompts", "1", *HELDOUT]))
    last = rows(tmp_path / "opd" / "metrics.jsonl")[-1]
    assert {"heldout/ocr", "heldout/pickscore", "heldout/deqa"} <= set(last)
    assert last["heldout/average"] == pytest.approx(
        (last["heldout/ocr"] + last["heldout/pickscore"] / 26 + last["heldout/deqa"] / 5) / 3)
    cold_start.main(cold_start.parse_args([
        "--model", tiny_model, "--data-root", str(world / "data"), "--out", str(tmp_path / "sft"),
        "--init", "sft", "--teachers", teachers, "--steps", "2", "--batch-size", "2", "--rank", "2",
        "--alpha", "2", "--max-steps", "2", "--report-to", "tensorboard"]))
    events = EventAccumulator(str(tmp_path / "sft" / "tensorboard"))
    events.Reload()
    logged = rows(tmp_path / "sft" / "metrics.jsonl")
    assert [(s.step, s.value) for s in events.Scalars("loss")] == \
        [(r["step"], pytest.approx(r["loss"])) for r in logged]


def entry(step, signal, deqa):
    return {"step": step, "signal": signal, "heldout/deqa": float(np.mean(deqa)),
            "scores": {"deqa": list(deqa)}}


def test_hacking_signature_is_a_rising_reward_and_a_drop_beyond_two_paired_standard_errors():
    before, mid = [4.0, 4.2, 3.8, 4.1], [4.0, 4.1, 3.9, 4.0]
    dropped = [3.5, 3.6, 3.4, 3.5]
    se = np.subtract(dropped, before).std(ddof=1) / 2
    history = [entry(0, 0.1, before), entry(5, 0.2, mid), entry(10, 0.3, dropped)]
    assert common.hacking_warning(history, "training reward", best_step=5) == (
        "reward hacking? the training reward rose 0.1 -> 0.3 while held-out deqa fell 4.025 -> "
        f"3.5 (paired s.e. {se:.2g}) since step 0; best/ holds step 5")
    noisy = [3.0, 5.0, 3.0, 5.0]  # the mean falls 0.025, well within its paired noise
    history = [entry(0, 0.1, before), entry(5, 0.2, mid), entry(10, 0.3, noisy)]
    assert common.hacking_warning(history, "r", 0) is None
    falling = [entry(0, 0.3, before), entry(5, 0.2, mid), entry(10, 0.1, dropped)]  # reward too
    assert common.hacking_warning(falling, "r", 0) is None
    too_few = [entry(0, 0.1, before), entry(5, 0.3, dropped)]
    assert common.hacking_warning(too_few, "r", 0) is None


def test_stop_on_hacking_ends_the_run_with_a_checkpoint(tiny_model, world, tmp_path, fakes,
                                                        monkeypatch, capsys):
    monkeypatch.setattr(common, "hacking_warning",
                        lambda history, *a: "hacked" if len(history) >= 2 else None)
    grpo(tiny_model, world, tmp_path, "--max-steps", "5", "--save-every", "10", "--eval-prompts",
         "1", *HELDOUT, "--stop-on-hacking")
    logged = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == [0, 1]
    assert [r["heldout/hacking"] for r in logged] == [0.0, 1.0]
    assert common.find_checkpoint("auto", str(tmp_path)).endswith("checkpoint-1")
    assert (tmp_path / "final").is_dir()
    assert "step 1: hacked; stopping (--stop-on-hacking)" in capsys.readouterr().out


def test_plot_draws_a_panel_per_quantity_of_every_run(tmp_path):
    grpo_rows = [{"step": s, "loss": 0.1 * s, "reward_mean": 0.5 + s, "kl": 0.01, "lr": 1e-3,
                  "step_time": 1.0} for s in range(5)]
    for s in (1, 3):
        grpo_rows[s].update({"heldout/deqa": 4.0 - s, "heldout/deqa_se": 0.1,
                             "heldout/hacking": float(s > 2)})
    opd_rows = [{"step": s, "loss": 1.0, "kl/ocr": 0.2, "kl/geneval": 0.1, "mar_kl": 0.3}
                for s in range(3)]
    for name, logged in [("teacher", grpo_rows), ("student", opd_rows)]:
        os.makedirs(tmp_path / name / "best")
        lines = "".join(json.dumps(r) + "\n" for r in logged)
        (tmp_path / name / "metrics.jsonl").write_text(lines + '{"step": 9, "lo')  # a live run
    (tmp_path / "teacher" / "best" / "best.json").write_text(json.dumps({"step": 1}))
    assert evaluate.curve_keys(grpo_rows + opd_rows) == [
        "reward_mean", "loss", "kl", "mar_kl", "kl/geneval", "kl/ocr", "heldout/deqa"]
    path = evaluate.main(evaluate.parse_args([
        "--plot", str(tmp_path / "teacher"), str(tmp_path / "student"), "--out",
        str(tmp_path / "curves.png")]))
    from PIL import Image
    assert Image.open(path).size == (3 * 460, 3 * 320)  # 7 panels: 3 columns, 3 rows, 100 dpi
    assert np.asarray(Image.open(path).convert("L")).std() > 10  # drawn, not blank
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        evaluate.main(evaluate.parse_args(["--plot", str(tmp_path), "--out", str(tmp_path)]))


def test_the_command_line_shows_numbers_not_library_noise(tiny_model, world, tmp_path):
    out = tmp_path / "opd"
    argv = ["--model", tiny_model, "--data-root", str(world / "data"), "--out", str(out),
            "--teachers", f"ocr={world / 'ocr'},pickscore={world / 'pickscore'}", "--mar-teacher",
            str(world / "anchor"), "--init", "none", "--batch-size", "2", "--group-size", "2",
            "--steps", "3", "--micro-batch", "4", "--max-steps", "1", "--eval-every", "1",
            "--threads", "1"]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "opd.py"), *argv],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    for noise in ("Already found a `peft_config`", "requires torchvision",
                  "Loading pipeline components", "Loading weights"):
        assert noise not in run.stderr, noise
    assert "OPD: 100%" in run.stderr
    assert all(f in run.stderr for f in ("loss=", " kl/", "mar_kl="))
    assert run.stdout.splitlines()[-1] == (f"wrote {out}/final/ (the LoRA), {out}/metrics.jsonl, "
                                           f"{out}/grids/ (eval grids)")
