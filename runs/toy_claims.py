"""The paper's claims, checked on a table of runs/toy.sh: paired comparisons of the distilled
student against each teacher, the base, mixed-reward GRPO and the fast recipe, per seed.

    python runs/toy_claims.py out/toy            # prints and writes out/toy/claims.md

Every comparison is evaluate.py's paired difference (same prompts, same noise; +- its standard
error over prompts). Rows a table lacks are skipped. The checks, as the recipe should meet them:
  - the student reaches >= 0.97x each task teacher on that teacher's task;
  - its DeQA is not below the base's by more than one paired s.e.;
  - its Average is above grpo-mix's (same training time, same seed) by >= 2 paired s.e.; the two
    runs' summed step times are printed beside it;
  - opd-fast: step time <= 0.5x opd-merge's, Average >= 0.95x, each teacher ratio >= 0.95x;
  - out of distribution (the *_ood columns): the student against grpo-mix and each teacher.
"""
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evaluate  # noqa: E402  (the project root, when run as runs/toy_claims.py)

TASKS = ["geneval", "ocr", "pickscore"]
OOD = [t + "_ood" for t in TASKS]


def step_times(out, name):
    """Seconds of each step of a training run (its metrics.jsonl), or None."""
    path = os.path.join(out, name, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    return [json.loads(line)["step_time"] for line in open(path) if line.strip()] or None


def step_time(out, name):
    """Median seconds of a training run's steps, or None."""
    times = step_times(out, name)
    return sorted(times)[len(times) // 2] if times else None


@functools.lru_cache(maxsize=None)
def paired(out, a, b):
    """evaluate.py's paired difference A - B, read from the two rows' caches once per pair."""
    return evaluate.paired_difference(out, a, b)


def diff(out, a, b, column):
    """(A - B, its paired s.e.) on one column."""
    row = paired(out, a, b)
    se = row["stderr"][column]
    return row[column], float("nan") if se is None else se  # None: one prompt (a smoke test)


def fmt(d, se):
    return f"{d:+.3f} ± {se:.3f}"


def ratio(a, b):
    """a / b, or nan when b is 0 (a smoke test's teacher can score 0)."""
    return a / b if b else float("nan")


def student_lines(out, rows, student, mix):
    """The checks of one distilled student against the teachers, the base and `mix`."""
    lines, ok = [], []
    for task in TASKS:
        teacher = f"teacher-{task}"
        if teacher not in rows:
            continue
        r = ratio(rows[student][task], rows[teacher][task])
        d, se = diff(out, student, teacher, task)
        ok.append(r >= 0.97)
        verdict = "above, by >= 2 s.e." if d > 0 and d >= 2 * se else ("yes" if r >= 0.97 else "no")
        lines.append(f"| {student} vs {teacher} on {task} | {r:.3f}x | {fmt(d, se)} | "
                     f">= 0.97x: {verdict} |")
    d, se = diff(out, student, "base", "deqa")
    ok.append(d >= -se)
    lines.append(f"| {student} vs base on deqa | {ratio(rows[student]['deqa'], rows['base']['deqa']):.3f}x | "
                 f"{fmt(d, se)} | not below by > 1 s.e.: {'yes' if d >= -se else 'no'} |")
    if mix in rows:
        times = step_times(out, mix), step_times(out, student)
        if None not in times:  # the baseline's training time, as measured in this run
            a, b = sum(times[0]), sum(times[1])
            r = ratio(a, b)
            lines.append(f"| {mix} vs {student}: training time (summed step times) | {r:.2f}x | "
                         f"{a:.0f} s vs {b:.0f} s | the same within 10%: "
                         f"{'yes' if abs(r - 1) <= 0.1 else 'no'} |")
        d, se = diff(out, student, mix, "average")
        ok.append(d >= 2 * se)
        lines.append(f"| {student} vs {mix} on average | "
                     f"{ratio(rows[student]['average'], rows[mix]['average']):.3f}x | {fmt(d, se)} | "
                     f"above by >= 2 s.e.: {'yes' if d >= 2 * se else 'no'} |")
    return lines, all(ok)


def fast_lines(out, rows, fast, full):
    ratios = {t: ratio(rows[fast][t], rows[f"teacher-{t}"][t]) for t in TASKS
              if f"teacher-{t}" in rows}
    avg = ratio(rows[fast]["average"], rows[full]["average"])
    d, se = diff(out, fast, full, "average")
    times = step_time(out, fast), step_time(out, full)
    cost = times[0] / times[1] if None not in times else float("nan")
    ok = cost <= 0.5 and avg >= 0.95 and all(r >= 0.95 for r in ratios.values())
    return [f"| {fast} vs {full}: step time (median) | {cost:.2f}x | {times[0]:.1f} s vs "
            f"{times[1]:.1f} s | <= 0.5x: {'yes' if cost <= 0.5 else 'no'} |",
            f"| {fast} vs {full} on average | {avg:.3f}x | {fmt(d, se)} | "
            f">= 0.95x: {'yes' if avg >= 0.95 else 'no'} |",
            f"| {fast} vs each teacher on its task | "
            + ", ".join(f"{t} {r:.3f}x" for t, r in ratios.items())
            + f" | | >= 0.95x: {'yes' if all(r >= 0.95 for r in ratios.values()) else 'no'} |"], ok


def ood_lines(out, rows, student, others):
    lines = []
    for other in others:
        if other not in rows:
            continue
        cells = []
        for column in OOD:
            if column in rows[student] and column in rows[other]:
                cells.append(fmt(*diff(out, student, other, column)))
        if cells:
            lines.append(f"| {student} - {other} | " + " | ".join(cells) + " |")
    return lines


def main(out):
    with open(os.path.join(out, "table.json")) as f:
        rows = {r["model"]: r for r in json.load(f)["rows"]}
    text = ["# The paper's claims on this table", "",
            f"Paired differences (row - other, same prompts and noise) ± their standard error; "
            f"ratios of the table's means. Made by `python runs/toy_claims.py {out}`.", "",
            "| comparison | ratio | difference | check |", "|---|---|---|---|"]
    verdicts = []
    for student, mix in [("opd-merge", "grpo-mix"), ("opd-merge-seed1", "grpo-mix-seed1")]:
        if student in rows:
            lines, ok = student_lines(out, rows, student, mix)
            text += lines
            verdicts.append(f"{student}: {'every check holds' if ok else 'not every check holds'}")
    if "opd-fast" in rows and "opd-merge" in rows:
        lines, ok = fast_lines(out, rows, "opd-fast", "opd-merge")
        text += lines
        verdicts.append(f"opd-fast: {'every check holds' if ok else 'not every check holds'}")
    if "opd-merge" in rows and any(c in rows["opd-merge"] for c in OOD):
        text += ["", "Out of distribution (held-out combinations; no model trained on them):", "",
                 "| student - other | " + " | ".join(OOD) + " |", "|---" * (len(OOD) + 1) + "|"]
        others = ["base", "grpo-mix"] + [f"teacher-{t}" for t in TASKS] + ["merge-init"]
        text += ood_lines(out, rows, "opd-merge", others)
        if "opd-merge-seed1" in rows:
            text += ood_lines(out, rows, "opd-merge-seed1", ["grpo-mix-seed1"])
    text += [""] + [f"- {v}" for v in verdicts]
    with open(os.path.join(out, "claims.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python runs/toy_claims.py OUT_DIR (a folder runs/toy.sh wrote)")
    main(sys.argv[1])
