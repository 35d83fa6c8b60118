"""Decide whether runs/toy.sh may reuse a stage's folder: only when it was made from the same toy
world and the same command line. A folder made otherwise is removed, so the stage trains afresh
(--resume auto would otherwise continue another run's checkpoints).

    python runs/stage_stamp.py WORLD_JSON FOLDER -- COMMAND...          # prints reuse | resume | run
    python runs/stage_stamp.py WORLD_JSON FOLDER --done -- COMMAND...   # the stage finished

reuse: the stage finished with this stamp; resume: it started with this stamp and did not finish
(its checkpoints are kept for --resume auto); run: a fresh start (another stamp's folder removed).

The stamp is a hash of the world's build config (toy.py writes it into world.json, with toy.py's
own hash) and of the command line; it lives in FOLDER/stamp.json.
"""
import hashlib
import json
import os
import shutil
import sys


def stamp(world_json, command):
    with open(world_json) as f:
        world = json.load(f)["config"]
    text = json.dumps({"world": world, "command": list(command)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check(folder, value, command):
    """'reuse', 'resume' or 'run' (see the module docstring); marks FOLDER as started with `value`."""
    path = os.path.join(folder, "stamp.json")
    saved = {}
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    if saved.get("stamp") == value:
        return "reuse" if saved.get("done") else "resume"
    if os.path.exists(folder):
        shutil.rmtree(folder)
    record(folder, value, command, done=False)
    return "run"


def record(folder, value, command, done):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "stamp.json.tmp"), "w") as f:
        json.dump({"stamp": value, "done": done, "command": list(command)}, f, indent=1)
    os.replace(os.path.join(folder, "stamp.json.tmp"), os.path.join(folder, "stamp.json"))


def main(argv):
    if "--" not in argv or len(argv) < 4:
        raise SystemExit("usage: stage_stamp.py WORLD_JSON FOLDER [--done] -- COMMAND...")
    split = argv.index("--")
    (world_json, folder, *flags), command = argv[:split], argv[split + 1:]
    value = stamp(world_json, command)
    if flags == ["--done"]:
        record(folder, value, command, done=True)
    else:
        print(check(folder, value, command))


if __name__ == "__main__":
    main(sys.argv[1:])
