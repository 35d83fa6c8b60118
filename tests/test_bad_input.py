"""Bad input over the four command lines: each case exits non-zero (2 for a mistake, 1 for a fault such
as a NaN loss) with one error line on stderr, '<script>: error: ...', that names the bad value and what
was expected (and no traceback), and leaves no partial output behind (no file appears under --out). Cases run in-process
through common.cli, the stages' real entry point; a few run as real subprocesses to check that no
traceback reaches the user.

More bad-input cases live beside each stage's tests (test_teacher_grpo.py, test_opd.py,
test_cold_start.py, test_evaluate.py, test_rewards.py); this file does not repeat them."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import cold_start
import common
import evaluate
import opd
import rewards
import teacher_grpo
from conftest import ROOT, write_distill_world

SCRIPTS = {"teacher_grpo": teacher_grpo, "opd": opd, "cold_start": cold_start, "evaluate": evaluate}


@pytest.fixture(scope="module")
def paths(tiny_model, tmp_path_factory):
    """Good and broken inputs: a data root, teacher LoRAs, a LoRA of another base model, a corrupt
    safetensors file, empty folders, a data root with an empty task, a checkpoint with a corrupt state.pt."""
    root = tmp_path_factory.mktemp("bad_input")
    write_distill_world(tiny_model, root)
    state, config = common.read_lora(str(root / "ocr"))  # the same modules, twice as wide: another base model
    common.write_lora({k: torch.cat([v, v], 1) if "lora_A" in k else v for k, v in state.items()}, config, str(root / "wide"))
    (root / "corrupt").mkdir()
    (root / "corrupt" / "pytorch_lora_weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")
    (root / "empty").mkdir()
    (root / "hollow" / "ocr").mkdir(parents=True)  # a task folder without a prompt file
    (root / "blank" / "ocr").mkdir(parents=True)
    (root / "blank" / "ocr" / "train.txt").write_text("\n\n")
    (root / "broken_run" / "checkpoint-0").mkdir(parents=True)
    (root / "broken_run" / "checkpoint-0" / "state.pt").write_bytes(b"not a torch file")
    (root / "broken_run" / "latest").write_text("checkpoint-0")
    return {k: str(root / k) for k in ("data", "ocr", "pickscore", "anchor", "wide", "corrupt", "empty", "hollow",
                                       "blank", "broken_run")} | {"missing": str(root / "missing"), "model": tiny_model}


def base_argv(script, p):
    """A command line of `script` that runs (one tiny step); a case appends the flags it breaks."""
    teachers = f"ocr={p['ocr']},pickscore={p['pickscore']}"
    model = ["--model", p["model"], "--data-root", p["data"], "--threads", "1"]
    return {
        "teacher_grpo": model + ["--tasks", "ocr", "--reward", "jpeg", "--batch-size", "2", "--group-size", "4",
                                 "--steps", "3", "--micro-batch", "4", "--eval-every", "0", "--max-steps", "1"],
        "opd": model + ["--teachers", teachers, "--mar-teacher", p["anchor"], "--init", "none", "--batch-size", "2",
                        "--group-size", "2", "--steps", "3", "--micro-batch", "4", "--eval-every", "0", "--max-steps", "1"],
        "cold_start": model + ["--init", "sft", "--teachers", teachers, "--steps", "2", "--batch-size", "2",
                               "--rank", "2", "--alpha", "2", "--max-steps", "1"],
        "merge": ["--init", "merge", "--teachers", teachers],
        "evaluate": model + ["--tasks", "ocr", "--metrics", "ocr=jpeg,deqa=none", "--steps", "2", "--grid", "0"],
    }[script]


# (script, flags appended to a good command line, expected message: it names the value and what was expected)
CASES = {
    # data
    "missing data root": ("teacher_grpo", ["--data-root", "{missing}"],
                          r"--data-root '.*missing' does not exist; expected Flow-GRPO's dataset/ layout"),
    "empty data root": ("teacher_grpo", ["--data-root", "{empty}", "--tasks", "all"],
                        r"--data-root '.*empty' holds no task folders; expected Flow-GRPO's dataset/ layout"),
    "task missing from the data root": ("teacher_grpo", ["--data-root", "{empty}"], r"unknown task 'ocr': '.*empty' has tasks \[\]"),
    "task folder without prompts": ("teacher_grpo", ["--data-root", "{hollow}"],
                                    r"task 'ocr' has no train prompts: expected .*train.txt or .*train_metadata.jsonl"),
    "empty prompt file": ("teacher_grpo", ["--data-root", "{blank}"], r"task 'ocr': .*train.txt holds no prompts"),
    "no task named": ("teacher_grpo", ["--tasks", ","], r"--tasks ',' names no task; expected comma-separated"),
    "unknown task (sft)": ("cold_start", ["--tasks", "ocr,nope"], r"unknown task 'nope': '.*data' has tasks \['ocr', 'pickscore'\]"),
    "empty data root (evaluate)": ("evaluate", ["--data-root", "{empty}", "--tasks", "all"], r"'.*empty' holds no task folders"),
    # rewards
    "unknown reward of a task": ("teacher_grpo", ["--reward", "ocr=nope"], r"unknown reward 'nope'; known rewards: ocr, "),
    "task without a reward": ("teacher_grpo", ["--tasks", "ocr,pickscore", "--reward", "ocr=jpeg"],
                              r"--reward gives no reward for task\(s\) \['pickscore'\]; it names \['ocr'\]"),
    "unknown best-of reward (sft)": ("cold_start", ["--best-of", "2", "--reward", "ocr=nope;pickscore=jpeg"],
                                     r"unknown reward 'nope'"),
    "zero reward-server attempts": ("teacher_grpo", ["--reward-attempts", "0"], r"--reward-attempts must be a positive number, got 0"),
    "negative reward-server backoff": ("evaluate", ["--reward-backoff", "-1"], r"--reward-backoff must be >= 0 seconds, got -1.0"),
    # model and adapters
    "model folder missing": ("teacher_grpo", ["--model", "{missing}"], r"--model '.*missing': no such diffusers folder"),
    "model folder not a pipeline": ("opd", ["--model", "{data}"], r"--model '.*data' is a folder but not a diffusers pipeline"),
    "teacher adapter path missing": ("opd", ["--teachers", "ocr={missing},pickscore={pickscore}"],
                                     r"teacher 'ocr': adapter '.*missing' does not exist"),
    "teacher folder without a LoRA": ("opd", ["--teachers", "ocr={empty},pickscore={pickscore}"],
                                      r"no LoRA in '.*empty': expected adapter_model.safetensors"),
    "teacher of another base model": ("opd", ["--teachers", "ocr={wide},pickscore={pickscore}"],
                                      r"adapter '.*wide' module '.*' has shape .*: is the adapter for another base model\?"),
    "corrupt teacher safetensors": ("opd", ["--teachers", "ocr={corrupt},pickscore={pickscore}"],
                                    r"cannot read .*corrupt/pytorch_lora_weights.safetensors: .*\(a corrupt or partial download\?\)"),
    "corrupt MAR anchor": ("opd", ["--mar-teacher", "{corrupt}"], r"cannot read .*corrupt/pytorch_lora_weights.safetensors"),
    "init adapter missing": ("opd", ["--init", "{missing}"], r"adapter '.*missing' does not exist"),
    "malformed teacher list": ("opd", ["--teachers", "ocr"], r"--teachers item 'ocr': expected task=adapter"),
    "corrupt teacher (merge)": ("merge", ["--teachers", "ocr={corrupt},pickscore={pickscore}"], r"cannot read .*corrupt"),
    "merge weights not numbers": ("merge", ["--weights", "1,x"], r"--weights '1,x': expected comma-separated numbers"),
    "merge weights count": ("merge", ["--weights", "1"], r"--weights has 1 numbers for 2 teachers \(ocr, pickscore\)"),
    "merge rank zero": ("merge", ["--merge-rank", "0"], r"--merge-rank 0 must be between 1 and the stacked rank 8"),
    "corrupt adapter (evaluate)": ("evaluate", ["--adapters", "{corrupt}"], r"cannot read .*corrupt"),
    "adapter of another base model (evaluate)": ("evaluate", ["--adapters", "{wide}"],
                                                 r"adapter '.*wide' module .*another base model\?"),
    # sizes
    "negative max steps": ("teacher_grpo", ["--max-steps", "-1"], r"--max-steps must be a positive number, got -1"),
    "zero micro-batch": ("opd", ["--micro-batch", "0"], r"--micro-batch must be a positive number, got 0"),
    "zero batch size (sft)": ("cold_start", ["--batch-size", "0"], r"--batch-size must be a positive number, got 0"),
    "zero batch size (evaluate)": ("evaluate", ["--batch-size", "0"], r"--batch-size must be a positive number, got 0"),
    "zero resolution": ("teacher_grpo", ["--resolution", "0"], r"--resolution must be a positive number, got 0"),
    "resolution off the patch grid": ("evaluate", ["--resolution", "7"],
                                      r"--resolution 7 must be a multiple of 2 for this model \(VAE factor 1 x patch size 2\)"),
    "zero threads": ("opd", ["--threads", "0"], r"--threads must be a positive number, got 0"),
    "negative eval interval": ("teacher_grpo", ["--eval-every", "-1"], r"--eval-every must be >= 0 \(0: never\), got -1"),
    "timestep fraction above 1": ("teacher_grpo", ["--timestep-fraction", "1.5"], r"--timestep-fraction must be in \(0, 1\], got 1.5"),
    "zero noise level": ("opd", ["--noise-level", "0"], r"--noise-level must be > 0 for on-policy SDE rollouts"),
    "EMA decay of 1": ("teacher_grpo", ["--ema", "1"], r"--ema must be a decay in \(0, 1\), e.g. 0.99, got 1.0"),
    "EMA decay of 0 (sft)": ("cold_start", ["--ema", "0"], r"--ema must be a decay in \(0, 1\)"),
    "zero DDP timeout": ("opd", ["--ddp-timeout", "0"], r"--ddp-timeout must be a positive number, got 0"),
    "group samples not dividing into updates": ("opd", ["--updates-per-step", "3"],
                                                r"samples per process \(4\) must divide into --updates-per-step \(3\) equal minibatches"),
    # resume
    "resume to an empty folder": ("teacher_grpo", ["--resume", "{empty}"],
                                  r"--resume '.*empty' is not a checkpoint folder \(no state.pt\); pass a <out>/checkpoint-N folder or 'auto'"),
    "resume to an empty folder (opd)": ("opd", ["--resume", "{empty}"], r"--resume '.*empty' is not a checkpoint folder"),
    "resume to an empty folder (sft)": ("cold_start", ["--resume", "{empty}"], r"--resume '.*empty' is not a checkpoint folder"),
    "resume from a corrupt checkpoint": ("teacher_grpo", ["--resume", "auto"],
                                         r"checkpoint '.*checkpoint-0' cannot be read \(.*\); delete that folder"),
    # watching a run and custom rewards
    "unknown logger": ("teacher_grpo", ["--report-to", "tensorbored"],
                       r"--report-to 'tensorbored': expected none, tensorboard, wandb or "
                       r"tensorboard,wandb"),
    "unknown logger (sft)": ("cold_start", ["--report-to", "mlflow"],
                             r"--report-to 'mlflow': expected none"),
    "logger package not installed": ("opd", ["--report-to", "tensorboard,wandb"],
                                     r"--report-to wandb needs the wandb package: "
                                     r"pip install wandb"),
    "held-out metric that does not exist": (
        "teacher_grpo", ["--eval-every", "1", "--eval-prompts", "1", "--eval-metrics",
                         "ocr=jpeg,deqa=none", "--select-by", "deqa"],
        r"--select-by 'deqa' is not a held-out metric of this run; "
        r"choose one of \['ocr', 'average'\]"),
    "held-out prompts without an interval": ("opd", ["--eval-prompts", "2"],
                                             r"--eval-prompts 2 needs .*--eval-every N > 0"),
    "stop on hacking without held-out metrics": (
        "opd", ["--stop-on-hacking"],
        r"--stop-on-hacking needs held-out metrics: --eval-every N --eval-prompts K"),
    "unreachable reward URL": ("teacher_grpo", ["--reward", "url:http://127.0.0.1:1"],
                               r"reward server http://127.0.0.1:1 cannot be reached "
                               r"\(ConnectionRefusedError.*\); start it"),
    "reward module missing": ("teacher_grpo", ["--reward", "no_such_reward_module:score"],
                              r"reward 'no_such_reward_module:score': no module "
                              r"'no_such_reward_module' in the working"),
    # faults: exit 1, the message says the checkpoints are kept
    "NaN reward": ("teacher_grpo", ["--reward", "nan_reward"],
                   r"the 'ocr' reward is nan for prompt 'a sign that says .*', expected a finite number: stopping; "
                   r"the checkpoints in '.*' are intact: rerun with --resume auto"),
    "NaN loss": ("teacher_grpo", [], r"the gradient norm is nan, expected a finite number: stopping. The last good checkpoint"),
    "NaN loss (opd)": ("opd", [], r"the gradient norm \(NaN KL or loss\?\) is nan, expected a finite number"),
    "NaN loss (sft)": ("cold_start", [], r"the gradient norm of the flow matching loss is nan, expected a finite number"),
}
FAULTS = {"NaN reward", "NaN loss", "NaN loss (opd)", "NaN loss (sft)"}


def inject_nan(case, monkeypatch):
    """The NaN cases: a reward or a loss that turns NaN on the first step (and a logger that is
    not installed)."""
    nan = float("nan")
    if case == "logger package not installed":
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if not installed
    elif case == "NaN reward":
        monkeypatch.setitem(rewards.REWARDS, "nan_reward", lambda: lambda images, prompts, metadata: [nan] * len(images))
    elif case == "NaN loss":
        clip = common.ppo_clip_loss
        monkeypatch.setattr(common, "ppo_clip_loss", lambda *a: (clip(*a)[0] * nan, *clip(*a)[1:]))
    elif case == "NaN loss (opd)":
        loss = common.opd_loss
        monkeypatch.setattr(common, "opd_loss", lambda *a, **k: loss(*a, **k) * nan)
    elif case == "NaN loss (sft)":
        loss = common.fm_loss
        monkeypatch.setattr(common, "fm_loss", lambda *a: loss(*a) * nan)


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_with_one_clear_sentence_and_leaves_nothing(case, paths, tmp_path, monkeypatch, capsys):
    script, flags, message = CASES[case]
    out = tmp_path / "out"
    if case == "resume from a corrupt checkpoint":
        shutil.copytree(paths["broken_run"], out)
    before = files_under(out)
    inject_nan(case, monkeypatch)
    argv = base_argv(script, paths) + ["--out", str(out)] + [f.format(**paths) for f in flags]
    module = SCRIPTS["cold_start" if script == "merge" else script]
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py"])
    with pytest.raises(SystemExit) as stop:
        common.cli(module.main, lambda: module.parse_args(argv))
    assert stop.value.code == (1 if case in FAULTS else 2)
    err = capsys.readouterr().err  # besides the error: progress bars of the model loading and of the steps
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"{module.__name__}.py: error: ") and "Traceback" not in err, err
    assert re.search(message, errors[0]), errors[0]
    left = [f for f in files_under(out) if f not in before]
    if case == "NaN loss (sft)":  # the teacher samples are done, complete and reused by a rerun: they stay
        left = [f for f in left if not (f.startswith("samples/") or f == "samples.png")]
    assert left == []  # no checkpoint, final/, metrics row or cache left behind


def test_the_suite_covers_every_kind_of_mistake_the_issue_lists():
    kinds = ["missing data root", "empty data root", "unknown task (sft)", "unknown reward of a task",
             "teacher adapter path missing", "teacher of another base model", "zero micro-batch",
             "negative max steps", "group samples not dividing into updates", "resume to an empty folder",
             "corrupt teacher safetensors", "NaN loss"]  # "teacher missing for a task": test_opd, test_cold_start
    assert set(kinds) <= set(CASES) and len(CASES) >= 40


@pytest.mark.parametrize("script,flags,message", [
    ("teacher_grpo", ["--data-root", "{missing}"], "--data-root"),
    ("opd", ["--teachers", "ocr={corrupt},pickscore={pickscore}"], "a corrupt or partial download?"),
    ("evaluate", ["--batch-size", "0"], "--batch-size must be a positive number, got 0"),
])
def test_the_command_line_prints_no_traceback(paths, tmp_path, script, flags, message):
    argv = base_argv(script, paths) + ["--out", str(tmp_path / "out")] + [f.format(**paths) for f in flags]
    run = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), *argv], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "out").exists()
