"""runs/toy.sh reuses a stage's folder only when it finished from the same world with the same flags."""
import json
import os
import subprocess
import sys

from conftest import ROOT

STAMP = os.path.join(ROOT, "runs", "stage_stamp.py")


def stage_state(world, folder, *command, done=False):
    argv = [sys.executable, STAMP, str(world), str(folder), *(["--done"] if done else []), "--", *command]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def write_world(path, **config):
    path.write_text(json.dumps({"config": {"seed": 0, "steps": 4500, "toy_py_sha256": "abc", **config}}))


def test_a_stage_is_reused_only_from_the_same_world_and_flags(tmp_path):
    world, folder = tmp_path / "world.json", tmp_path / "teacher"
    write_world(world)
    cmd = ["teacher_grpo.py", "--lr", "1e-3"]
    assert stage_state(world, folder, *cmd) == "run"
    (folder / "checkpoint-9").mkdir()
    assert stage_state(world, folder, *cmd) == "resume"  # died before it finished: checkpoints kept
    assert (folder / "checkpoint-9").is_dir()
    stage_state(world, folder, *cmd, done=True)
    assert stage_state(world, folder, *cmd) == "reuse"
    assert stage_state(world, folder, "teacher_grpo.py", "--lr", "2e-3") == "run"  # other flags
    assert not (folder / "checkpoint-9").exists()  # the other run's folder is gone
    stage_state(world, folder, "teacher_grpo.py", "--lr", "2e-3", done=True)
    write_world(world, steps=150)  # a --quick world, or a rebuilt one
    assert stage_state(world, folder, "teacher_grpo.py", "--lr", "2e-3") == "run"
