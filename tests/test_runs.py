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


def write_row(out, name, geneval, ocr, pickscore, deqa, step_time=None):
    """A row's per-image cache (4 prompts per task) and its metrics.jsonl, as evaluate.py and the
    trainers write them."""
    cache = out / "cache" / name
    cache.mkdir(parents=True)
    for task, values in (("geneval", geneval), ("ocr", ocr), ("pickscore", pickscore)):
        with open(cache / f"{task}.jsonl", "w") as f:
            for i, v in enumerate(values):
                scores = {task: v, "deqa": deqa[i]}
                f.write(json.dumps({"i": i, "j": 0, "prompt": f"{task} {i}", "scores": scores,
                                    **({"tag": "colors"} if task == "geneval" else {})}) + "\n")
    if step_time is not None:
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "step_time": step_time}) + "\n" for s in range(3)))


def test_claims_are_paired_comparisons_of_the_table(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "runs"))
    import evaluate
    import rewards
    import toy_claims
    d = [4.0, 4.2, 4.4, 4.6]
    rows = {"base": ([0, 0, 1, 0], [.2] * 4, [10.0] * 4, d),
            "teacher-geneval": ([1, 0, 1, 0], [.2] * 4, [10.0] * 4, d),
            "teacher-ocr": ([0, 0, 1, 0], [.4, .5, .6, .5], [10.0] * 4, d),
            "teacher-pickscore": ([0, 0, 1, 0], [.2] * 4, [13, 14, 15, 14], d),
            "grpo-mix": ([0, 1, 1, 0], [.3] * 4, [11.0] * 4, d),
            "opd-merge": ([1, 0, 1, 0], [.5, .5, .5, .5], [14, 14, 14, 14], [3.9, 4.2, 4.4, 4.6]),
            "opd-fast": ([1, 0, 1, 0], [.5, .4, .5, .5], [14, 14, 13, 14], d)}
    times = {"opd-merge": 10.0, "opd-fast": 4.0, "grpo-mix": 10.5}
    table = []
    for name, values in rows.items():
        write_row(tmp_path, name, *values, step_time=times.get(name))
        table.append({"model": name, **rewards.summarize(list(
            evaluate.read_results(str(tmp_path), name).values()))})
    (tmp_path / "table.json").write_text(json.dumps({"rows": table}))
    toy_claims.main(str(tmp_path))
    text = (tmp_path / "claims.md").read_text()
    # GenEval: equal images, so a difference of exactly 0 is "yes", not "above"
    assert "| opd-merge vs teacher-geneval on geneval | 1.000x | +0.000 ± 0.000 | >= 0.97x: yes |" in text
    # OCR: differences +.1, 0, -.1, 0: mean 0, s.e. sqrt(0.02 / 3) / 2 = 0.041
    assert "| opd-merge vs teacher-ocr on ocr | 1.000x | +0.000 ± 0.041 | >= 0.97x: yes |" in text
    # DeQA on all 12 images: -0.1 on prompt 0 of each task: mean -0.025, s.e. 0.0131; 4.275 / 4.3
    assert "| opd-merge vs base on deqa | 0.994x | -0.025 ± 0.013 | not below by > 1 s.e.: no |" in text
    # Average (0.5 + 0.5 + 4.275 / 5 + 14 / 26) / 4 = 0.598 vs (0.5 + 0.3 + 0.86 + 11 / 26) / 4 = 0.521;
    # its s.e. is GenEval's (differences 1, -1, 0, 0: 0.408) / 4, the others' nearly 0
    assert "| opd-merge vs grpo-mix on average | 1.149x | +0.078 ± 0.102 | above by >= 2 s.e.: no |" in text
    # the baseline's training time beside it: 3 steps of 10.5 s vs 3 of 10 s
    assert ("| grpo-mix vs opd-merge: training time (summed step times) | 1.05x | 32 s vs 30 s | "
            "the same within 10%: yes |") in text
    assert "| opd-fast vs opd-merge: step time (median) | 0.40x | 4.0 s vs 10.0 s | <= 0.5x: yes |" in text
    assert "opd-fast vs each teacher on its task | geneval 1.000x, ocr 0.950x, pickscore 0.982x" in text
    assert "- opd-merge: not every check holds" in text and "- opd-fast: every check holds" in text
