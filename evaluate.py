"""Score a model on the paper's benchmarks and add its row to a side-by-side table.

    python evaluate.py --model stabilityai/stable-diffusion-3.5-medium --name base \\
        --data-root dataset
    torchrun --nproc_per_node 8 evaluate.py --adapters out/opd/final --name flow-opd \\
        --data-root dataset

The protocol is the paper's (Flow-GRPO's): ODE sampling (noise level 0), 40 steps, CFG 4.5, one
image per test prompt whose noise depends only on (seed, task, prompt index, image index), so
every model sees the same noise. Each task's images are scored by its metric, and every image by
DeQA. Per-image results are cached in <out>/cache/<name>/<task>.jsonl: a killed run continues
where it stopped, and a finished one is not regenerated; a column added later (a task, an extra
task) samples only its own images, and a column whose reward spec changed is scored again alone.
Reward servers (url: specs, GENEVAL_URL, DEQA_URL) must answer before anything is sampled.
Outputs:

    <out>/table.json               {"rows": [{"model", "geneval", "ocr", "deqa", "pickscore",
                                              "average", "stderr", "geneval_tags", "n", ...}]};
                                   a rerun replaces its row
    <out>/table.md                 the paper's layout, Model | GenEval | OCR | DeQA | PickScore |
                                   Average (| extra tasks...), then per-tag accuracies
    <out>/grids/<task>/<name>.png  the first --grid prompts of each task, same noise for every model

`python evaluate.py --out OUT --compare A B` prints row A - row B judged prompt by prompt (paired).

Columns, on the paper's scale:
    geneval    GenEval's overall score: the accuracy of its strict per-image `correct`, per tag,
               averaged over tags
    ocr        OCR accuracy, 1 - min(edit distance, len) / len of the quoted text, in [0, 1]
    deqa       DeQA-Score (1-5), on the images of all in-domain tasks (not --extra-tasks)
    pickscore  PickScore, the raw logit (~21-23 on SD3.5-M)
    average    the paper's Average = mean(GenEval, OCR, DeQA / 5, PickScore / 26)
               (rewards.paper_average)
Each score comes with its standard error over prompts (the images of one prompt are not
independent).

Out-of-distribution (or any other) prompts: `--extra-tasks NAME=PATH[,NAME=PATH...]` adds a task
NAME per prompt set, a column NAME after Average, scored by `--metrics NAME=REWARD` (any spec of
rewards.py: a name, module:function, a blend, url:http://host:port). PATH is a folder in
Flow-GRPO's layout (<PATH>/<split>_metadata.jsonl or <PATH>/<split>.txt, --split), a .txt file
(one prompt a line: T2I-CompBench's dataset_val/color_val.txt) or a .jsonl file (GenEval metadata
rows: Flow-GRPO's geneval_unseen_objects). Its noise depends on (seed, NAME, i, j) like any task's;
--limit, the cache, --compare and grids/NAME/ work as for the paper's tasks. DeQA scores only the
in-domain tasks' images, so an extra task changes neither the DeQA column nor a row's Average. A
column whose metric reports GenEval's per-image `correct` (and `tag`) is GenEval's score whatever
its name: strict accuracy per tag, averaged over tags, with its tags in table.json as
<NAME>_tags (GenEval's own: geneval_tags) and in table.md's per-tag tables.

    python evaluate.py --adapters out/opd/final --name flow-opd --extra-tasks \\
        unseen=dataset/geneval_unseen_objects,color=T2I-CompBench/dataset_val/color_val.txt \\
        --metrics unseen=geneval,color=url:http://127.0.0.1:18090

A model folder can name its own metrics in its flow_opd.json ("metrics": {column: reward spec},
"metric_scales": {spec: factor to the column's scale}); the toy world names its analogues so
(toy.py): geneval = the strict `correct` of toy:reward_geneval, GenEval's rule over a shape
detector, in [0, 1]; ocr = toy:reward_ocr, the real OCR formula over a glyph reader, in [0, 1];
deqa = toy:reward_deqa, already on DeQA's 1-5 scale; pickscore = toy:reward_pickscore x 26 (its
reward is in [0, 1], "like PickScore / 26"). So the Average's / 5 and / 26 apply unchanged, and on
the toy world it is the mean of toy GenEval, toy OCR, toy DeQA / 5 and the toy PickScore reward.
rewards.TABLE_SCALE holds the factors of the paper's rewards.

`python evaluate.py --plot RUN_DIR... --out OUT` draws the curves of training runs (their
metrics.jsonl) into OUT/curves.png, one panel per quantity and one line per run.
"""
import argparse
import fcntl
import hashlib
import json
import math
import os
import re
import shutil

import numpy as np
import torch.distributed as dist

import common
import rewards

# the other keys of a table row, which a column name must not take
ROW_KEYS = {"model", "stderr", "n", "metrics", "extra_tasks", "adapters", "settings", "generated"}
COLUMNS = [("geneval", "GenEval"), ("ocr", "OCR"), ("deqa", "DeQA"), ("pickscore", "PickScore"),
           ("average", "Average")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(parser)
    parser.add_argument("--adapters", default="",
                        help="LoRA folders/files or hub ids, comma-separated, all active together "
                             "(none = the base model)")
    parser.add_argument("--name", default=None,
                        help="row name in the table (default: 'base' or the adapter paths)")
    parser.add_argument("--data-root", default="dataset",
                        help="Flow-GRPO's dataset/ folder (<task>/test.txt, ...)")
    parser.add_argument("--tasks", default="all",
                        help="comma-separated tasks, or 'all': those of geneval, ocr, pickscore "
                             "(any task with a metric) present in --data-root; DeQA scores every "
                             "task's images")
    parser.add_argument("--split", default="test")
    parser.add_argument("--extra-tasks", default="", metavar="NAME=PATH[,NAME=PATH...]",
                        help="more prompt sets, each a column NAME after Average scored by "
                             "--metrics NAME=REWARD (not in DeQA or the Average); PATH: a folder "
                             "in Flow-GRPO's layout (--split), a .txt or a .jsonl file")
    parser.add_argument("--metrics", default="",
                        help="column=reward overrides, comma-separated, e.g. 'deqa=none'. "
                             "Defaults: geneval=geneval,ocr=ocr,pickscore=pickscore,deqa=deqa "
                             "(servers: GENEVAL_URL, DEQA_URL), or those the model folder's "
                             "flow_opd.json names (the toy's)")
    parser.add_argument("--sample-steps", "--steps", dest="steps", type=int, default=40,
                        help="ODE sampling steps, the paper's eval: 40 (--steps: the old name)")
    parser.add_argument("--cfg", type=float, default=4.5,
                        help="classifier-free guidance scale w in (CFG)")
    parser.add_argument("--sample-batch", "--batch-size", dest="batch_size", type=int, default=16,
                        help="images sampled at once, per process (--batch-size: the old name)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N prompts of each task")
    parser.add_argument("--images-per-prompt", type=int, default=1,
                        help="images per prompt (more lowers the standard error "
                             "on small test sets)")
    parser.add_argument("--grid", type=int, default=8, help="prompts per task in the image grids")
    parser.add_argument("--out", default="out/eval",
                        help="folder of table.json, table.md, grids/ and cache/")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                        help="print A - B, prompt by prompt, from two evaluated rows' caches in "
                             "--out (no sampling)")
    parser.add_argument("--plot", nargs="+", metavar="RUN_DIR", default=None,
                        help="draw the curves of training runs (their metrics.jsonl) into "
                             "--out/curves.png (or --out, a .png); needs matplotlib")
    common.add_reward_server_args(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- metrics

# ----------------------------------------------------------------------------- cache (resume)

def read_cache(cache_dir, settings):
    """{(task, i, j): result} from an earlier run with the same settings; another run's cache is
    discarded. A later line of an item replaces an earlier one. Metrics count one column at a
    time: a run with more or fewer task columns keeps the cache, a task column whose reward spec
    changed loses its file (<task>.jsonl), and a changed quality metric (deqa) starts the cache
    over."""
    path = os.path.join(cache_dir, "settings.json")
    specs = settings.get("metric_specs", {})
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        per_column = ("metrics", "metric_specs")
        old_specs = old.get("metric_specs", {})
        respecified = sorted(c for c in specs if c in old_specs and old_specs[c] != specs[c])
        changed = sorted(k for k in set(old) | set(settings)
                         if k not in per_column and old.get(k) != settings.get(k))
        changed += ["deqa metric"] if "deqa" in respecified else []
        if changed:
            print(f"evaluate: the cache in {cache_dir} was made with other {', '.join(changed)}: "
                  "starting it over")
            shutil.rmtree(cache_dir)
        else:
            for column in respecified:  # that column's images are scored again
                if os.path.isfile(os.path.join(cache_dir, f"{column}.jsonl")):
                    print(f"evaluate: {column} was scored with {old_specs[column]!r} in "
                          f"{cache_dir}: scoring it again with {specs[column]!r}")
                    os.remove(os.path.join(cache_dir, f"{column}.jsonl"))
            # remember the specs of columns this run leaves out, for a later run that has them
            specs = {**old_specs, **specs}
    settings = {**settings, **({"metric_specs": specs} if specs else {})}
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)
    done = {}
    for name in sorted(n for n in os.listdir(cache_dir) if n.endswith(".jsonl")):
        path = os.path.join(cache_dir, name)
        entries = read_cache_file(path)
        done.update({(name[:-len(".jsonl")], r["i"], r["j"]): r for _, r in entries})
        # without the broken line, so appending starts on a fresh line
        with open(path + ".tmp", "w") as f:
            f.writelines(line for line, _ in entries)
        os.replace(path + ".tmp", path)
    return done


def read_cache_file(path):
    """[(line, result)] of one task's cache file, in order, without the half-written last line of
    a killed run."""
    entries = []
    with open(path) as f:
        for line in f:
            try:
                entries.append((line.rstrip("\n") + "\n", json.loads(line)))
            except ValueError:
                continue
    return entries


def cache_name(name):
    """The file name of a row's cache folder and grids."""
    return re.sub(r"[^\w.+-]+", "_", name).strip("._")


def append_cache(cache_dir, results):
    by_task = {}
    for r in results:
        by_task.setdefault(r["task"], []).append(r)
    for task, rows in by_task.items():
        with open(os.path.join(cache_dir, f"{task}.jsonl"), "a") as f:
            f.writelines(json.dumps({k: v for k, v in r.items() if k != "task"}) + "\n"
                         for r in rows)
            f.flush()


# ----------------------------------------------------------------------------- summary

def read_results(out_dir, name):
    """Per-image results of an evaluated row, from its cache: {(task, i, j): result}."""
    cache_dir = os.path.join(out_dir, "cache", cache_name(name))
    if not os.path.isdir(cache_dir):
        raise FileNotFoundError(f"no evaluation of {name!r} in {out_dir} (no {cache_dir}); "
                                "evaluate it first")
    results = {}
    for file in sorted(f for f in os.listdir(cache_dir) if f.endswith(".jsonl")):
        task = file[:-len(".jsonl")]
        results.update({(task, r["i"], r["j"]): {"task": task, **r}
                        for _, r in read_cache_file(os.path.join(cache_dir, file))})
    return results


def paired_difference(out_dir, a, b):
    """Row A - row B on the images both have. Every row sees the same prompts and noise, so the
    difference is judged prompt by prompt: its standard error leaves out what the prompts share
    (how hard each one is), and is smaller than the two rows' own errors combined. Every column is
    linear in the per-image scores, GenEval's mean over tags and the Average included, so this is
    summarize() of the per-image differences."""
    ra, rb = read_results(out_dir, a), read_results(out_dir, b)
    both = sorted(set(ra) & set(rb))
    if not both:
        raise ValueError(f"rows {a!r} and {b!r} have no image in common "
                         "(other tasks, splits or --limit?)")
    if any(ra[k]["prompt"] != rb[k]["prompt"] for k in both):
        raise ValueError(f"rows {a!r} and {b!r} were evaluated on different prompt files")
    diffs = [{**ra[k], "scores": {c: ra[k]["scores"][c] - rb[k]["scores"][c]
                                  for c in ra[k]["scores"] if c in rb[k]["scores"]}} for k in both]
    return {"model": f"{a} - {b}", **rewards.summarize(diffs)}


# ----------------------------------------------------------------------- the in-process entry point

def evaluate(pipe, prompts, metrics, seed=0, steps=40, guidance_scale=4.5, resolution=512,
             max_sequence_length=256, shift=3.0, batch_size=16, images_per_prompt=1, device="cpu",
             mixed_precision=None, cache_dir=None, settings=None, progress=True,
             quality_tasks=None):
    """Score the pipeline's transformer (with its active adapters) on `prompts`; returns the
    table row.

    prompts: common.Prompt list (common.load_prompts); a prompt's index counts within its task, so
    the same prompt list gives every model the same noise. metrics: {column: details function}, as
    load_metric returns; the column named like a task scores that task's images, 'deqa' scores
    those of quality_tasks (None: all).
    Under torchrun each rank samples a strided share; every rank gets the row. With cache_dir,
    results are cached there and only missing images are generated; `settings` (with the sampling
    settings) identifies the cache: a cache made with other settings is started over.
    Returns the row, plus "generated": the number of images sampled in this call.
    """
    from tqdm import tqdm
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    items = common.eval_items(prompts, images_per_prompt)
    settings = {"seed": seed, "steps": steps, "cfg": guidance_scale, "resolution": resolution,
                "max_sequence_length": max_sequence_length, "shift": shift,
                "metrics": sorted(metrics), **(settings or {})}
    done = read_cache(cache_dir, settings) if cache_dir and rank == 0 else {}

    def needed(task):  # the columns that score a task's images
        quality = "deqa" in metrics and (quality_tasks is None or task in quality_tasks)
        return ({task} & set(metrics)) | ({"deqa"} if quality else set())

    def cached(it):  # the item's cached result, when it is for this prompt and has every column
        result = done.get((it.task, it.i, it.j), {})
        return result.get("prompt") == it.prompt.text and needed(it.task) <= set(result["scores"])

    # an item is missing when it is not cached, cached for another prompt (the prompt file
    # changed) or cached without a column it needs (a metric added since)
    missing = common.gather_objects([k for k, it in enumerate(items)  # rank 0's list on every rank
                                     if not cached(it)],
                                    "receiving rank 0's list of missing images")[0]
    mine = missing[rank::world]  # strided share: ranks sample the same number of images, +-1
    rounds = math.ceil(len(missing) / (world * batch_size))
    bar = tqdm(total=len(missing), desc="evaluate", disable=not (progress and rank == 0))
    for r in range(rounds):  # every rank takes part in every round's gather, with a batch or none
        batch = [items[k] for k in mine[r * batch_size:(r + 1) * batch_size]]
        results = []
        if batch:
            images = common.generate_items(pipe, batch, seed, steps, guidance_scale, resolution,
                                           max_sequence_length, shift, batch_size, device,
                                           mixed_precision)
            scored = rewards.score_items(metrics, batch, images, quality_tasks)
            results = [{"task": it.task, **res} for it, res in zip(batch, scored)]
        results = [res for part in common.gather_objects(results, "gathering the scored images")
                   for res in part]
        if rank == 0:
            if cache_dir:
                append_cache(cache_dir, results)
            done.update({(res["task"], res["i"], res["j"]): res for res in results})
            bar.update(len(results))
    bar.close()
    row = None
    if rank == 0:
        results = [done[(it.task, it.i, it.j)] for it in items]
        row = rewards.summarize([{**r, "task": it.task, "scores": {
            c: v for c, v in r["scores"].items() if c in needed(it.task)}}
            for it, r in zip(items, results)])
        row["generated"] = len(missing)
    return common.gather_objects(row, "receiving rank 0's table row")[0]


def save_grids(pipe, prompts, out_dir, name, count, seed, steps, guidance_scale, resolution,
               max_sequence_length, shift, batch_size, device, mixed_precision=None):
    """<out>/grids/<task>/<name>.png: image 0 of the first `count` prompts of each task, in one
    row, with the evaluation's own noise: the same images as scored, and the same noise for every
    model."""
    items = [it for it in common.eval_items(prompts) if it.i < count]
    images = common.generate_items(pipe, items, seed, steps, guidance_scale, resolution,
                                   max_sequence_length, shift, batch_size, device, mixed_precision)
    # nearest-neighbour, so that toy images (32 px) stay visible
    zoom = max(1, 128 // images.shape[-1])
    images = images.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)
    for task in dict.fromkeys(it.task for it in items):
        idx = [k for k, it in enumerate(items) if it.task == task]
        os.makedirs(os.path.join(out_dir, "grids", task), exist_ok=True)
        common.save_grid(images[idx], os.path.join(out_dir, "grids", task, f"{name}.png"),
                         nrow=len(idx))


# ----------------------------------------------------------------------------- the table

def write_table(out_dir, row):
    """Put `row` into <out>/table.json (replacing the row of the same model) and rewrite table.md.
    Evaluations of several models into one folder may finish together: the update holds a file
    lock."""
    path = os.path.join(out_dir, "table.json")
    with open(os.path.join(out_dir, "table.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        rows = []
        if os.path.isfile(path):
            with open(path) as f:
                rows = json.load(f)["rows"]
        names = [r["model"] for r in rows]
        if row["model"] in names:
            rows[names.index(row["model"])] = row
        else:
            rows.append(row)
        for name, text in (("table.json", json.dumps({"rows": rows}, indent=1)),
                           ("table.md", markdown(rows))):
            with open(os.path.join(out_dir, name + ".tmp"), "w") as f:
                f.write(text + "\n")
            os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    return rows


def markdown(rows):
    """The paper's table, every score +- its standard error, the extra tasks' columns after
    Average, then the per-tag accuracies of GenEval (and of GenEval-like extra columns)."""
    def cell(row, key):
        if row.get(key) is None:
            return "-"
        stderr = row.get("stderr", {}).get(key)
        return f"{row[key]:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")

    known = {key for key, _ in COLUMNS}
    extra = list(dict.fromkeys(c for r in rows for c in r.get("n", {}) if c not in known))
    columns = COLUMNS + [(c, c) for c in extra]
    lines = ["| Model | " + " | ".join(title for _, title in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join([r["model"]] + [cell(r, key) for key, _ in columns]) + " |"
              for r in rows]
    lines += ["", "Scores ± standard error over prompts. Average = mean(GenEval, OCR, DeQA / 5, "
                  "PickScore / 26)."]
    if extra:
        lines[-1] += (f" After Average, other prompt sets ({', '.join(extra)}): "
                      "in neither DeQA nor the Average.")
    for column, title in columns:
        key = f"{column}_tags"
        tags = sorted({tag for r in rows for tag in r.get(key, {})})
        if not tags:
            continue
        lines += ["", f"{title} accuracy by tag:", "", "| Model | " + " | ".join(tags) + " |",
                  "|---" * (len(tags) + 1) + "|"]
        lines += ["| " + " | ".join([r["model"]] + [f"{r[key][t]:.3f}" if t in r.get(key, {})
                                                     else "-" for t in tags]) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- curves of runs

def curve_keys(rows):
    """The quantities worth a panel, in order: reward, losses, KLs, then the held-out metrics."""
    keys = dict.fromkeys(k for row in rows for k in row)
    first = [k for k in ("reward_mean", "loss", "opd_loss", "kl", "mar_kl") if k in keys]
    heldout = [k for k in keys if k.startswith("heldout/") and not k.endswith("_se")]
    return (first + sorted(k for k in keys if k.startswith("kl/"))
            + sorted(k for k in heldout if k != "heldout/hacking"))


def plot_runs(run_dirs, path):
    """One PNG of the curves of training runs: a panel per quantity, a line per run (faint: each
    step, solid: the mean of the last 5; log scale when they span over 100x); held-out metrics as
    points with their standard error, a star at the step each run's best/ holds, a red x where the
    hacking check fired."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    runs = {}
    for run in run_dirs:
        file = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"--plot {run!r}: no metrics.jsonl there; pass the --out "
                                    "folders of training runs")
        rows = [row for _, row in read_cache_file(file)]  # a live run's half line is left out
        best_step = None
        if os.path.isfile(os.path.join(run, "best", "best.json")):
            with open(os.path.join(run, "best", "best.json")) as f:
                best_step = json.load(f)["step"]
        runs[os.path.basename(os.path.normpath(run)) or run] = (rows, best_step)
    keys = curve_keys([r for rows, _ in runs.values() for r in rows])
    if not keys:
        raise ValueError("--plot: the runs' metrics.jsonl hold no reward, loss, KL or held-out "
                         "values")
    ncols, nrows = min(3, len(keys)), math.ceil(len(keys) / 3)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for k, (name, (rows, best_step)) in enumerate(runs.items()):
            points = [r for r in rows if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            steps, values = [r["step"] for r in points], [r[key] for r in points]
            if not key.startswith("heldout/"):  # noisy per step: faint, with a 5-step running mean
                running = [float(np.mean(values[max(0, i - 4):i + 1])) for i in range(len(values))]
                ax.plot(steps, values, color=f"C{k}", lw=0.8, alpha=0.35)
                marker = "." if len(steps) < 30 else None  # a short run stays visible
                ax.plot(steps, running, color=f"C{k}", lw=1.5, marker=marker, label=name)
                continue
            errors = [r.get(key + "_se") or 0.0 for r in points]
            ax.errorbar(steps, values, yerr=errors, color=f"C{k}", marker="o", ms=3, capsize=2,
                        label=name)
            hacked = [(s, v) for s, v, r in zip(steps, values, points) if r.get("heldout/hacking")]
            if hacked:
                ax.scatter(*zip(*hacked), color="red", marker="x", s=60, zorder=3)
            if best_step in steps:
                ax.scatter([best_step], [values[steps.index(best_step)]], color=f"C{k}",
                           marker="*", s=160, zorder=3)
        drawn = [v for line in ax.get_lines() for v in line.get_ydata()]
        positive = [v for v in drawn if v > 0]
        if positive and min(drawn) >= 0 and max(positive) > 100 * min(positive):  # unlike scales
            ax.set_yscale("log", nonpositive="mask")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the script

def select_tasks(spec, root, specs):
    """--tasks -> task list; 'all' = the data root's tasks that have a metric (DeQA is not a prompt
    set)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data-root {root!r} does not exist; expected Flow-GRPO's "
                                "dataset/ layout (<root>/<task>/test.txt or test_metadata.jsonl)")
    known = common.parse_tasks("all", root)
    scored = sorted(set(specs) - {"deqa"})
    if spec == "all":
        tasks = [t for t in known if t in scored]
        if not tasks:
            raise ValueError(f"--data-root {root!r} has none of the tasks {scored} "
                             f"(it has {known})")
        return tasks
    tasks = common.parse_tasks(spec, root)
    for task in tasks:
        if task not in known:
            raise ValueError(f"unknown task {task!r}: --data-root {root!r} has tasks {known}")
        if task not in scored:
            raise ValueError(f"no metric for task {task!r}: pass --metrics {task}=REWARD "
                             f"(columns with one: {scored})")
    return tasks


def parse_extra_tasks(spec, root):
    """--extra-tasks 'NAME=PATH,...' -> {NAME: PATH}, each NAME free: not a task of the data
    root, nor a column of the paper's table."""
    taken = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) \
        if os.path.isdir(root) else []
    extra = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, sep, path = (s.strip() for s in item.partition("="))
        if not sep or not name or not path:
            raise ValueError(f"--extra-tasks item {item!r}: expected NAME=PATH "
                             "(e.g. color=T2I-CompBench/dataset_val/color_val.txt)")
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
            raise ValueError(f"--extra-tasks name {name!r}: use letters, digits, '_', '.' or '-' "
                             "(it names a column, a cache file and a grid folder)")
        if name in extra:
            raise ValueError(f"--extra-tasks names {name!r} twice; give each prompt set its "
                             "own name")
        if name in taken:
            raise ValueError(f"--extra-tasks name {name!r} is an in-domain task of --data-root "
                             f"{root!r}; choose another name")
        if name in {key for key, _ in COLUMNS} or name in ROW_KEYS or name.endswith("_tags"):
            raise ValueError(f"--extra-tasks name {name!r} is a column or key of the table "
                             f"(reserved: {', '.join(k for k, _ in COLUMNS)}, "
                             f"{', '.join(sorted(ROW_KEYS))}, *_tags); choose another name")
        extra[name] = path
    return extra


def load_adapters(transformer, loras, paths=None):
    """Attach LoRAs given as (state, config) (common.read_lora), all active together; [] = the
    base model.
    paths: where they came from, named in errors."""
    names = []
    for k, (state, config) in enumerate(loras):
        names.append(f"eval_{k}")
        common.add_lora_from_state(transformer, names[-1], state, config,
                                   source=paths[k] if paths else None)
    if names:
        transformer.set_adapters(names)
    return names


def weights_id(transformer):
    """sha1 of the LoRA weights: a retrained adapter at the same path must not reuse the old
    cache."""
    digest = hashlib.sha1()
    for n, p in sorted(transformer.named_parameters()):
        if "lora_" in n:
            digest.update(n.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main(args):
    if args.plot:
        path = args.out if args.out.endswith(".png") else os.path.join(args.out, "curves.png")
        plot_runs(args.plot, path)
        print(f"curves of {len(args.plot)} run(s) -> {path}")
        return path
    if args.compare:
        row = paired_difference(args.out, *args.compare)
        print("Paired difference (same prompts and noise), ± its standard error over prompts:\n")
        print(markdown([row]).split("\n\nScores")[0])
        return row
    ddp = common.setup_distributed(args.device, args.threads, args.ddp_timeout)
    args = common.resolve_model_args(args)
    common.check_positive(steps=args.steps, batch_size=args.batch_size,
                          images_per_prompt=args.images_per_prompt,
                          **({"limit": args.limit} if args.limit is not None else {}))
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip() and a.strip() != "base"]
    name = args.name or ("+".join(adapters) if adapters else "base")
    file_name = cache_name(name)
    model_info = common.model_defaults(args.model)
    specs = rewards.metric_specs(args.metrics, model_info.get("metrics"))
    tasks = select_tasks(args.tasks, args.data_root, specs)
    extra = parse_extra_tasks(args.extra_tasks, args.data_root)
    for task in extra:
        if task not in specs:
            raise ValueError(f"no metric for extra task {task!r}: pass --metrics {task}=REWARD "
                             "(a reward spec: a name, module:function, a blend or url:http://...)")
    prompts = common.load_prompts(args.data_root, tasks, args.split)
    for task, path in extra.items():
        prompts += common.load_prompt_file(path, task, args.split)
    if args.limit:
        prompts = [p for p, it in zip(prompts, common.eval_items(prompts)) if it.i < args.limit]
    server = common.reward_server_options(args)
    used = {column: spec for column, spec in specs.items()
            if column in tasks or column in extra or column == "deqa"}
    for spec in used.values():  # a server that is down or hung fails here, before any sampling
        rewards.check_servers(spec, min(server["timeout"], 10.0))
    metrics = {column: rewards.load_metric(spec, server, model_info.get("metric_scales"))
               for column, spec in used.items()}
    loras = [common.read_lora(path) for path in adapters]  # a bad path fails before the model loads

    pipe = common.load_stage_pipeline(args, ddp.device)
    load_adapters(pipe.transformer, loras, adapters)
    sampling = dict(seed=args.seed, steps=args.steps, guidance_scale=args.cfg,
                    resolution=args.resolution, max_sequence_length=args.max_sequence_length,
                    shift=args.shift, batch_size=args.batch_size, device=ddp.device,
                    mixed_precision=args.mixed_precision)
    settings = {"model": args.model, "adapters": adapters, "weights": weights_id(pipe.transformer),
                "metric_specs": {c: specs[c] for c in metrics}, "split": args.split,
                "mixed_precision": args.mixed_precision}
    row = evaluate(pipe, prompts, metrics, images_per_prompt=args.images_per_prompt,
                   cache_dir=os.path.join(args.out, "cache", file_name), settings=settings,
                   quality_tasks=tasks, **sampling)
    generated = row.pop("generated")
    row = {"model": name, **row, "metrics": settings["metric_specs"], "extra_tasks": extra,
           "adapters": adapters,
           "settings": {"steps": args.steps, "cfg": args.cfg, "resolution": args.resolution,
                        "seed": args.seed, "split": args.split, "limit": args.limit,
                        "images_per_prompt": args.images_per_prompt}}
    if ddp.is_main:
        grid_missing = any(not os.path.isfile(os.path.join(args.out, "grids", t,
                                                           f"{file_name}.png"))
                           for t in tasks + list(extra))
        if args.grid > 0 and (generated or grid_missing):
            save_grids(pipe, prompts, args.out, file_name, args.grid, **sampling)
        write_table(args.out, row)
        print(markdown([row]))
    common.barrier()
    common.cleanup_distributed()
    return row


if __name__ == "__main__":
    common.cli(main, parse_args)
