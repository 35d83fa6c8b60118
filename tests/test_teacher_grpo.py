"""teacher_grpo.py end to end on the tiny model: smoke, resume, loadable LoRA, DDP = one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import teacher_grpo
from conftest import ROOT


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for task, lines in {"ocr": ['a sign that says "ab"', 'a sign that says "cd"'], "pickscore": ["a cat", "a dog"]}.items():
        (root / task).mkdir()
        for split in ("train", "test"):
            (root / task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return str(root)


def _args(model, data_root, out, *extra):
    return teacher_grpo.parse_args(["--model", model, "--data-root", data_root, "--out", str(out), "--tasks", "ocr",
                                    "--reward", "jpeg", "--batch-size", "2", "--group-size", "4", "--steps", "3",
                                    "--micro-batch", "4", "--save-every", "1", "--eval-every", "0", *extra])


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_smoke_writes_metrics_checkpoints_and_a_loadable_lora(tiny_model, data_root, tmp_path):
    teacher_grpo.main(_args(tiny_model, data_root, tmp_path, "--max-steps", "2", "--eval-every", "1"))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    for key in ("loss", "reward_mean", "reward_std", "kl", "clip_frac", "approx_kl", "lr", "step_time"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[1]["kl"] > 0  # after one update the policy differs from the base
    assert sorted(os.listdir(tmp_path / "grids")) == ["step-00001.png", "step-00002.png"]
    assert common.find_checkpoint("auto", str(tmp_path)).endswith("checkpoint-1")
    pipe = common.load_pipeline(tiny_model)
    cond, _ = common.encode_prompts(pipe, ["a cat"], 1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = common.velocity(pipe.transformer, x, 0.5, *cond)
        pipe.load_lora_weights(str(tmp_path / "final"))
        tuned = common.velocity(pipe.transformer, x, 0.5, *cond)
    assert (tuned - base).abs().max() > 1e-4


def test_resume_continues_like_an_uninterrupted_run(tiny_model, data_root, tmp_path):
    teacher_grpo.main(_args(tiny_model, data_root, tmp_path / "full", "--max-steps", "3"))
    teacher_grpo.main(_args(tiny_model, data_root, tmp_path / "cut", "--max-steps", "2"))
    teacher_grpo.main(_args(tiny_model, data_root, tmp_path / "cut", "--max-steps", "3", "--resume", "auto"))
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == [0, 1, 2]
    for a, b in zip(full, cut):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-9)
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-6)
    la, _ = common.read_lora(str(tmp_path / "full" / "final"))
    lb, _ = common.read_lora(str(tmp_path / "cut" / "final"))
    assert all(torch.allclose(la[k], lb[k], atol=1e-6) for k in la)


def test_torchrun_two_processes_match_one(tiny_model, data_root, tmp_path):
    teacher_grpo.main(_args(tiny_model, data_root, tmp_path / "one", "--max-steps", "2"))
    argv = ["--model", tiny_model, "--data-root", data_root, "--out", str(tmp_path / "two"), "--tasks", "ocr",
            "--reward", "jpeg", "--batch-size", "2", "--group-size", "4", "--steps", "3", "--micro-batch", "4",
            "--save-every", "1", "--eval-every", "0", "--max-steps", "2"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", os.path.join(ROOT, "teacher_grpo.py"), *argv], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    for a, b in zip(one, two):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-5)
        # the surrogate is a cancellation (a group's advantages sum to 0) of terms A (rho - 1),
        # rho - 1 ~1e-6 here: other batch shapes move it by a few 1e-9, 0.5 % of its value
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2, abs=1e-9)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4)
    la, _ = common.read_lora(str(tmp_path / "one" / "final"))
    lb, _ = common.read_lora(str(tmp_path / "two" / "final"))
    assert all(torch.allclose(la[k], lb[k], atol=1e-5) for k in la)


@pytest.mark.parametrize("extra,message", [
    (["--group-size", "1"], "group-size must be >= 2"),
    (["--batch-size", "0"], "batch-size must be a positive"),
    (["--tasks", "nope"], "unknown task 'nope'"),
    (["--reward", "nope"], "nope"),
    (["--batch-size", "3", "--group-size", "3", "--updates-per-step", "2"], "equal minibatches"),
])
def test_bad_input_fails_with_a_clear_message(tiny_model, data_root, tmp_path, extra, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        teacher_grpo.main(_args(tiny_model, data_root, tmp_path / "bad", "--max-steps", "1", *extra))
    assert not (tmp_path / "bad").exists()


def test_resume_pointing_at_nothing_is_an_error(tiny_model, data_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        teacher_grpo.main(_args(tiny_model, data_root, tmp_path, "--max-steps", "1", "--resume", str(tmp_path / "x")))
