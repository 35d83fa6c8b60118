"""evaluate.py --extra-tasks: any prompt set, scored by any reward spec, as extra table columns."""
import json
import socket
import threading

import numpy as np
import pytest

import common
import evaluate
import reward_server
import rewards
from test_evaluate import FAKE_METRICS, count_images, data_root, fake_geneval, fakes, run  # noqa: F401

COLOR_PROMPTS = ["a red cube", "a blue ball", "a green cone"]
SHAPE_PROMPTS = ["a round sign", "a square dog"]


def redness(images, prompts, metadata):
    """A simple reward a test server serves: how red the image is, in [0, 1]."""
    red = images[..., 0].astype(np.float64)
    return red.mean(axis=(1, 2)) / 255 - 0.5 * images[..., 1].mean(axis=(1, 2)) / 255


@pytest.fixture
def served():
    """The redness reward behind a reward server on a free local port: its url."""
    server = reward_server.make_server(redness, port=0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def prompt_sets(tmp_path):
    """A T2I-CompBench-like category in Flow-GRPO's layout and one as a single .txt file."""
    (tmp_path / "compbench_color").mkdir()
    (tmp_path / "compbench_color" / "test.txt").write_text("\n".join(COLOR_PROMPTS) + "\n")
    (tmp_path / "shape_val.txt").write_text("\n".join(SHAPE_PROMPTS) + "\n\n")
    return tmp_path


def direct_images(tiny_model, texts, task):
    """The images evaluate.py samples for a task's prompts, sampled here without it."""
    pipe = common.load_pipeline(tiny_model)
    items = common.eval_items([common.Prompt(t, task, {}) for t in texts])
    images = common.generate_items(pipe, items, seed=0, steps=2, guidance_scale=4.5, resolution=8,
                                   max_sequence_length=1, shift=3.0, batch_size=4, device="cpu")
    return rewards.as_uint8(images)


def test_extra_columns_score_any_prompt_set_through_a_reward_server(
        tiny_model, data_root, tmp_path, fakes, count_images, served, prompt_sets):
    out = tmp_path / "out"
    base = run(tiny_model, data_root, out, "--grid", "1")
    in_domain = count_images["images"]
    extra = ["--extra-tasks", f"color={prompt_sets / 'compbench_color'},"
                              f"shape={prompt_sets / 'shape_val.txt'}",
             "--metrics", f"{FAKE_METRICS},color=url:{served},shape=url:{served}", "--grid", "1"]
    row = run(tiny_model, data_root, out, *extra)
    # the cached in-domain images are kept: 5 new images, then grids of one prompt of 5 tasks
    assert count_images["images"] == in_domain + 5 + 5
    for column in ("geneval", "ocr", "pickscore", "deqa", "average"):
        assert row[column] == base[column], column  # DeQA and the Average: in-domain images only
    assert row["n"]["deqa"] == base["n"]["deqa"] == 10
    for task, texts in (("color", COLOR_PROMPTS), ("shape", SHAPE_PROMPTS)):
        expected = redness(direct_images(tiny_model, texts, task), texts, None)
        assert row[task] == pytest.approx(expected.mean(), abs=1e-12)
        assert row["stderr"][task] == pytest.approx(expected.std(ddof=1) / np.sqrt(len(texts)))
        assert row["n"][task] == len(texts)
        assert (out / "grids" / task / "base.png").is_file()
    assert row["extra_tasks"]["shape"] == str(prompt_sets / "shape_val.txt")
    md = (out / "table.md").read_text()
    assert md.startswith("| Model | GenEval | OCR | DeQA | PickScore | Average | color | shape |")
    assert f"| {row['average']:.3f} ± {row['stderr']['average']:.3f} | {row['color']:.3f}" in md

    other = run(tiny_model, data_root, out, *extra, "--name", "other", "--cfg", "1.0")
    diff = evaluate.main(evaluate.parse_args(["--out", str(out), "--compare", "other", "base"]))
    for column in ("color", "shape", "deqa", "ocr"):  # same prompts: the mean of the differences
        assert diff[column] == pytest.approx(other[column] - row[column], abs=1e-12), column
    assert diff["stderr"]["color"] > 0


def test_genevals_rule_scores_a_genevallike_extra_column(tiny_model, data_root, tmp_path, fakes):
    rows = [{"tag": tag, "include": [{"class": "cat", "count": 1}], "prompt": text}
            for tag, text in [("colors", "a red cat"), ("colors", "a blue dog"),
                              ("counting", "two cats"), ("position", "a dog left of a cat")]]
    file = tmp_path / "unseen_metadata.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = run(tiny_model, data_root, tmp_path / "out", "--extra-tasks", f"unseen={file}",
              "--metrics", f"{FAKE_METRICS},unseen=fake_geneval", "--grid", "0")
    texts = [r["prompt"] for r in rows]
    correct = fake_geneval(direct_images(tiny_model, texts, "unseen"), texts, rows)["correct"]
    by_tag = {}
    for r, c in zip(rows, correct):
        by_tag.setdefault(r["tag"], []).append(float(c))
    assert row["unseen_tags"] == {t: np.mean(v) for t, v in by_tag.items()}
    assert row["unseen"] == pytest.approx(np.mean([np.mean(v) for v in by_tag.values()]))
    assert set(row["geneval_tags"]) == {"colors", "counting"}  # GenEval's own tags stay apart
    md = (tmp_path / "out" / "table.md").read_text()
    assert "GenEval accuracy by tag:" in md and "unseen accuracy by tag:" in md
    assert "| base | " + " | ".join(f"{row['unseen_tags'][t]:.3f}" for t in sorted(by_tag)) in md


@pytest.fixture
def hung_server():
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_bad_extra_tasks_fail_before_sampling(tiny_model, data_root, tmp_path, fakes, monkeypatch,
                                              count_images, served, prompt_sets, hung_server):
    color = prompt_sets / "compbench_color"

    def fails(error, match, spec, metrics=f"color=url:{served}", *more):
        with pytest.raises(error, match=match):
            run(tiny_model, data_root, tmp_path / "out", "--extra-tasks", spec,
                "--metrics", f"{FAKE_METRICS},{metrics}", *more)

    fails(FileNotFoundError, r"nope does not exist; expected a folder in Flow-GRPO's layout "
          r"\(<folder>/<split>_metadata.jsonl .*a .txt file .*a .jsonl file",
          f"color={tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    fails(FileNotFoundError, r"task 'color' has no test prompts: expected .*test.txt or "
          r".*test_metadata.jsonl", f"color={tmp_path / 'empty'}")
    (tmp_path / "prompts.csv").write_text("a cat\n")
    fails(ValueError, r"prompts.csv is no known prompt file; expected a folder",
          f"color={tmp_path / 'prompts.csv'}")
    fails(ValueError, r"--extra-tasks name 'ocr' is an in-domain task of --data-root .*; "
          "choose another name", f"ocr={color}")
    for reserved in ("deqa", "average", "n", "unseen_tags"):
        fails(ValueError, f"--extra-tasks name '{reserved}' is a column or key of the table "
              r"\(reserved: geneval, ocr, deqa, pickscore, average, adapters, .*\); choose another",
              f"{reserved}={color}")
    fails(ValueError, r"--extra-tasks item 'color': expected NAME=PATH", "color")
    fails(ValueError, r"no metric for extra task 'shape': pass --metrics shape=REWARD",
          f"color={color},shape={prompt_sets / 'shape_val.txt'}")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    fails(ValueError, f"reward server {down} cannot be reached .*; start it, or fix the url:",
          f"color={color}", f"color=url:{down}")
    fails(ValueError, f"reward server {hung_server} does not answer .*; restart it",
          f"color={color}", f"color=url:{hung_server}", "--reward-timeout", "0.5")
    monkeypatch.setenv("GENEVAL_URL", hung_server)
    fails(ValueError, r"reward server .* does not answer", f"color={color}", "color=geneval",
          "--reward-timeout", "0.5", "--tasks", "ocr")  # GENEVAL_URL's server, checked the same
    world = tmp_path / "world"
    (world / "data" / "pickscore").mkdir(parents=True)
    (world / "world.json").write_text("{}")
    (world / "data" / "pickscore" / "test.txt").write_text("a cat\n")
    rebuild = (f"the toy world {world} was built before that split existed .*; rebuild it with "
               f"`python toy.py --out {world}`")
    fails(FileNotFoundError, "ood.txt does not exist: " + rebuild,
          f"color={world / 'data' / 'pickscore' / 'ood.txt'}")
    folder = r"pickscore has no ood prompts \(ood.txt or ood_metadata.jsonl\): "
    with pytest.raises(FileNotFoundError, match=folder + rebuild):
        common.load_prompt_file(str(world / "data" / "pickscore"), "pickscore", "ood")
    assert count_images["images"] == 0 and not (tmp_path / "out" / "table.json").exists()


def test_an_extra_column_resumes_and_rescoring_keeps_the_other_images(
        tiny_model, data_root, tmp_path, fakes, count_images, served, prompt_sets):
    out = tmp_path / "out"
    args = ["--extra-tasks", f"color={prompt_sets / 'compbench_color'}", "--grid", "0",
            "--metrics", f"{FAKE_METRICS},color=url:{served}"]
    respecified = args[:-1] + [f"{FAKE_METRICS},color=fake_ocr"]
    first = run(tiny_model, data_root, out, *args, "--limit", "2")
    assert count_images["images"] == 8 and first["n"]["color"] == 2
    cache = out / "cache" / "base" / "color.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][:15])  # killed while writing the second line
    resumed = run(tiny_model, data_root, out, *args)
    assert count_images["images"] == 8 + 1 + 5  # color's second prompt, then the unlimited rest
    assert resumed["n"] == {"geneval": 4, "ocr": 3, "pickscore": 3, "deqa": 10, "color": 3}
    rescored = run(tiny_model, data_root, out, *respecified)
    assert count_images["images"] == 14 + 3  # only color's images, for its new metric
    assert rescored["deqa"] == resumed["deqa"] and rescored["color"] != resumed["color"]
    images = direct_images(tiny_model, COLOR_PROMPTS, "color")
    assert rescored["color"] == pytest.approx(np.mean(images[..., 0].mean(axis=(1, 2)) / 255))
