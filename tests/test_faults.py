"""Faults: a run killed (SIGKILL) in the middle of a step or of a checkpoint write resumes to the same
LoRA and metrics as an uninterrupted run, bit for bit on CPU; a hung rank stops the others within
--ddp-timeout and torchrun --max-restarts + --resume auto finishes the job; a reward server that
stays down stops the run with its checkpoints kept; the EMA is the running average it claims to be.

The kills use the test-only hook common.fault_point (FLOW_OPD_FAULT=step:N or checkpoint:N)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import cold_start
import common
import opd
import reward_server
import rewards
import teacher_grpo
from conftest import ROOT, write_distill_world

STAGES = {"teacher_grpo": teacher_grpo, "opd": opd, "cold_start": cold_start}


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """Two tasks in Flow-GRPO's layout and three random LoRAs (two teachers and a MAR anchor)."""
    root = tmp_path_factory.mktemp("faults")
    write_distill_world(tiny_model, root)
    return root


def stage_argv(stage, model, world, out, max_steps=3):
    """A few tiny steps of a stage, a checkpoint after every step."""
    data, teachers = str(world / "data"), f"ocr={world / 'ocr'},pickscore={world / 'pickscore'}"
    common_flags = ["--model", model, "--data-root", data, "--out", str(out), "--max-steps", str(max_steps),
                    "--save-every", "1", "--threads", "1"]
    return common_flags + {
        "teacher_grpo": ["--tasks", "ocr", "--reward", "jpeg", "--batch-size", "2", "--group-size", "4", "--steps", "3",
                         "--micro-batch", "4", "--eval-every", "0"],
        "opd": ["--teachers", teachers, "--mar-teacher", str(world / "anchor"), "--init", "none", "--batch-size", "2",
                "--group-size", "2", "--steps", "3", "--micro-batch", "4", "--eval-every", "0", "--ema", "0.9"],
        "cold_start": ["--init", "sft", "--teachers", teachers, "--steps", "2", "--batch-size", "2", "--rank", "2",
                       "--alpha", "2", "--ema", "0.9"],
    }[stage]


def rows(out):
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_time")}
            for line in open(os.path.join(out, "metrics.jsonl"))]


def assert_same_lora(a, b):
    la, _ = common.read_lora(str(a))
    lb, _ = common.read_lora(str(b))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def launch(script, argv, timeout=120, **env):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.parametrize("stage,fault", [("teacher_grpo", "step:1"), ("teacher_grpo", "checkpoint:1"),
                                         ("opd", "step:2"), ("cold_start", "checkpoint:2")])
def test_a_killed_run_resumes_to_the_uninterrupted_result_bit_for_bit(tiny_model, world, tmp_path, stage, fault):
    module = STAGES[stage]
    module.main(module.parse_args(stage_argv(stage, tiny_model, world, tmp_path / "full")))

    killed = launch(f"{stage}.py", stage_argv(stage, tiny_model, world, tmp_path / "cut"), FLOW_OPD_FAULT=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    where, n = fault.split(":")
    survivor = common.find_checkpoint("auto", str(tmp_path / "cut"))
    if where == "checkpoint":  # the half-written checkpoint is there, under a name resume ignores
        assert (tmp_path / "cut" / f".tmp-checkpoint-{n}").is_dir() and not (tmp_path / "cut" / f"checkpoint-{n}").exists()
    assert survivor.endswith(f"checkpoint-{int(n) - 1}")
    assert not (tmp_path / "cut" / "final").exists()

    module.main(module.parse_args(stage_argv(stage, tiny_model, world, tmp_path / "cut") + ["--resume", "auto"]))
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    assert_same_lora(tmp_path / "cut" / "final", tmp_path / "full" / "final")
    assert not list((tmp_path / "cut").glob(".tmp-*"))  # the rewrite of checkpoint n replaced the half one


def test_ema_is_the_running_average_and_becomes_the_final_lora(tiny_model, world, tmp_path):
    decay = 0.5
    teacher_grpo.main(teacher_grpo.parse_args(stage_argv("teacher_grpo", tiny_model, world, tmp_path) + ["--ema", str(decay)]))
    tr = common.load_pipeline(tiny_model).transformer
    torch.manual_seed(0)  # the stage's fresh LoRA
    tr.add_adapter(common.lora_config(32, 64), "policy")
    common.save_lora(tr, "policy", str(tmp_path / "init"))
    expected, _ = common.read_lora(str(tmp_path / "init"))
    for step in range(3):
        raw, _ = common.read_lora(str(tmp_path / f"checkpoint-{step}"))  # checkpoints hold the raw weights
        expected = {k: decay * v + (1 - decay) * raw[k] for k, v in expected.items()}
    final, _ = common.read_lora(str(tmp_path / "final"))
    assert all(torch.allclose(final[k], expected[k], atol=1e-7) for k in final)
    assert not all(torch.equal(final[k], raw[k]) for k in final)
    state = common.load_checkpoint_state(str(tmp_path / "checkpoint-2"))
    assert state["ema"]["decay"] == decay and len(state["rng"]) == 1 and {"python", "numpy", "torch"} <= set(state["rng"][0])


def test_nan_after_a_checkpoint_stops_and_keeps_it(tiny_model, world, tmp_path, monkeypatch):
    argv = stage_argv("teacher_grpo", tiny_model, world, tmp_path, max_steps=1)
    teacher_grpo.main(teacher_grpo.parse_args(argv))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoint-0").iterdir()}
    clip = common.ppo_clip_loss
    monkeypatch.setattr(common, "ppo_clip_loss", lambda *a: (clip(*a)[0] * float("nan"), *clip(*a)[1:]))
    with pytest.raises(FloatingPointError, match="is nan, expected a finite number.*--resume auto"):
        teacher_grpo.main(teacher_grpo.parse_args(stage_argv("teacher_grpo", tiny_model, world, tmp_path) +
                                                  ["--resume", "auto"]))
    assert common.find_checkpoint("auto", str(tmp_path)).endswith("checkpoint-0")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoint-0").iterdir()} == before
    assert not (tmp_path / "checkpoint-1").exists() and [r["step"] for r in rows(tmp_path)] == [0]


def test_atomic_folder_keeps_the_old_folder_when_a_write_fails(tmp_path):
    target = tmp_path / "final"
    with common.atomic_folder(str(target)) as tmp:
        open(os.path.join(tmp, "a"), "w").write("old")
    with pytest.raises(RuntimeError):
        with common.atomic_folder(str(target)) as tmp:
            open(os.path.join(tmp, "a"), "w").write("half")
            raise RuntimeError("killed")
    assert (target / "a").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["final"]
    with common.atomic_folder(str(target)) as tmp:
        open(os.path.join(tmp, "b"), "w").write("new")
    assert sorted(os.listdir(target)) == ["b"] and sorted(os.listdir(tmp_path)) == ["final"]


def test_metrics_logger_drops_a_half_written_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    common.MetricsLogger(str(tmp_path), resume_step=1).log({"step": 2, "loss": 3.0})
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [
        {"step": 0, "loss": 1.0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 3.0}]


# ----------------------------------------------------------------------------- reward servers


def test_a_reward_server_that_stays_down_stops_the_run_and_keeps_the_checkpoint(tiny_model, world, tmp_path,
                                                                             monkeypatch):
    calls = []

    def scorer(images, prompts, metadata):  # answers the first batch, then fails for good (HTTP 500)
        calls.append(len(images))
        if len(calls) > 1:
            raise RuntimeError("GPU fell off the bus")
        return {"reward": np.linspace(0, 1, len(images)), "correct": [True] * len(images), "tag": ["a"] * len(images)}

    server = reward_server.make_server(scorer, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("GENEVAL_URL", url)
    argv = stage_argv("teacher_grpo", tiny_model, world, tmp_path) + [
        "--reward", "geneval", "--reward-attempts", "2", "--reward-backoff", "0.01", "--reward-timeout", "5"]
    try:
        with pytest.raises(rewards.RewardServerError, match=f"reward server {url} failed after 2 attempt.*HTTP 500"):
            teacher_grpo.main(teacher_grpo.parse_args(argv))
    finally:
        server.shutdown()
    assert len(calls) == 3  # one good batch, then the bounded retries
    assert common.find_checkpoint("auto", str(tmp_path)).endswith("checkpoint-0")
    assert not (tmp_path / "final").exists()


def test_cli_turns_a_fault_into_one_sentence_and_exit_1(tmp_path, capsys, monkeypatch):
    def main(args):
        raise rewards.RewardServerError("reward server http://h:1 failed after 3 attempt(s): ConnectionRefusedError")

    monkeypatch.setattr(sys, "argv", ["teacher_grpo.py"])
    with pytest.raises(SystemExit) as stop:
        common.cli(main, lambda: teacher_grpo.parse_args(["--out", str(tmp_path)]))
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("teacher_grpo.py: error: reward server http://h:1 failed")
    assert f"checkpoints in '{tmp_path}' are intact: rerun with --resume auto" in err


# ----------------------------------------------------------------------------- DDP (torchrun, slow)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv, *launcher, timeout=240, **env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), *launcher, os.path.join(ROOT, "teacher_grpo.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_a_hung_rank_stops_the_job_within_the_ddp_timeout_and_a_torchrun_restart_resumes_it(tiny_model, world, tmp_path):
    """Slow (~50 s on 2 busy cores: two torchrun attempts of 2 processes). In the first attempt rank 1
    stops answering in step 1; rank 0 must stop within --ddp-timeout with a clear message (not wait
    forever), and torchrun --max-restarts 1 with --resume auto must then finish the run from checkpoint-0
    where a single uninterrupted process ends."""
    teacher_grpo.main(teacher_grpo.parse_args(stage_argv("teacher_grpo", tiny_model, world, tmp_path / "one")))
    run = torchrun(stage_argv("teacher_grpo", tiny_model, world, tmp_path / "two") + ["--ddp-timeout", "3",
                                                                                      "--resume", "auto"],
                   "--max-restarts", "1", FLOW_OPD_FAULT="step:1:hang", FLOW_OPD_FAULT_RANK="1")
    assert run.returncode == 0, run.stderr[-3000:]
    # rank 1 hangs right after its rollouts: rank 0 waits for its rewards
    assert "teacher_grpo.py: rank 0: error: rank 0 of 2: gathering a tensor from every process failed: " \
           "another process crashed, hung past --ddp-timeout or was preempted" in run.stderr, run.stderr[-3000:]
    assert "rerun with --resume auto" in run.stderr
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in two] == [0, 1, 2]
    for a, b in zip(one, two):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-8)  # ~1e-7: rank sums round differently
    la, _ = common.read_lora(str(tmp_path / "one" / "final"))
    lb, _ = common.read_lora(str(tmp_path / "two" / "final"))
    assert all(torch.allclose(la[k], lb[k], atol=1e-5) for k in la)
