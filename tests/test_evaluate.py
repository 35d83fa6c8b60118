"""evaluate.py: the eval sampler against diffusers, fixed noise, resume, the table, bad input; runs/sd35m.sh --dry-run."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import common
import evaluate
import rewards
from conftest import ROOT

FAKE_METRICS = "geneval=fake_geneval,ocr=fake_ocr,pickscore=fake_pickscore,deqa=fake_deqa"


def fake_geneval(images, prompts, metadata):
    """GenEval-like columns from the image brightness (deterministic, so reruns must agree)."""
    m = images.mean(axis=(1, 2, 3)) / 255
    return {"reward": m, "correct": [bool(x > 0.5) for x in m], "tag": [row["tag"] for row in metadata]}


def channel(c, scale=1.0, offset=0.0):
    return lambda images, prompts, metadata: offset + scale * images[..., c].mean(axis=(1, 2)) / 255


@pytest.fixture
def fakes(monkeypatch):
    """Fake rewards under the rewards.load registry (real OCR/servers are too slow or absent here)."""
    for name, fn in {"fake_geneval": fake_geneval, "fake_ocr": channel(0), "fake_pickscore": channel(1),
                     "fake_deqa": channel(2, 4.0, 1.0)}.items():
        monkeypatch.setitem(rewards.REWARDS, name, lambda fn=fn: fn)
    monkeypatch.setitem(rewards.TABLE_SCALE, "fake_pickscore", 26.0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"tag": tag, "include": [{"class": "cat", "count": 1}], "prompt": f"a {c} cat"}
            for tag, c in [("colors", "red"), ("colors", "blue"), ("counting", "red"), ("counting", "blue")]]
    os.makedirs(root / "geneval")
    (root / "geneval" / "test_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, lines in [("ocr", ['a sign says "ab"', 'a sign says "cat"', 'a sign says "dog"']),
                        ("pickscore", ["a red dog", "a blue dog", "a dog"])]:
        os.makedirs(root / task)
        (root / task / "test.txt").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture
def count_images(monkeypatch):
    """Counts the images that common.generate samples (evaluate.py's only way to sample)."""
    counter = {"images": 0, "noise": []}
    generate = common.generate

    def counting(pipe, texts, generators, **kwargs):
        counter["images"] += len(texts)
        counter["noise"] += [g.get_state() for g in generators]
        return generate(pipe, texts, generators, **kwargs)

    monkeypatch.setattr(common, "generate", counting)
    return counter


def run(tiny_model, data_root, out, *extra):
    args = ["--model", str(tiny_model), "--data-root", data_root, "--out", str(out), "--steps", "2",
            "--metrics", FAKE_METRICS, "--batch-size", "4", *extra]
    return evaluate.main(evaluate.parse_args(args))


def test_eval_images_match_stable_diffusion3_pipeline(tiny_pipe):
    prompts = [common.Prompt("a red cat", "ocr", {}), common.Prompt("a dog", "ocr", {})]
    items = common.eval_items(prompts)
    ours = common.generate_items(tiny_pipe, items, seed=3, steps=4, guidance_scale=4.5,
                                 resolution=8, max_sequence_length=1, shift=3.0, batch_size=2,
                                 device="cpu")
    generators = common.eval_generators(3, items)
    expected = tiny_pipe(prompt=[p.text for p in prompts], generator=generators,
                         num_inference_steps=4, guidance_scale=4.5, height=8, width=8, max_sequence_length=1,
                         output_type="pt").images
    assert ours.shape == (2, 3, 8, 8) and ours.std() > 0.01
    assert torch.allclose(ours, expected, atol=1e-5)


def test_noise_depends_only_on_task_prompt_and_image():
    prompt = lambda task: common.Prompt("a cat", task, {})
    items = common.eval_items([prompt("ocr"), prompt("ocr"), prompt("geneval")],
                              images_per_prompt=2)
    first = lambda its: [torch.randn(3, generator=g) for g in common.eval_generators(0, its)]
    noise = first(items)
    alone = first([items[3]])  # ocr prompt 1, image 1, sampled without the others
    assert torch.equal(noise[3], alone[0])
    assert all(not torch.equal(noise[a], noise[b]) for a in range(6) for b in range(a))  # task, i, j all matter
    assert torch.equal(first(items)[0], noise[0])  # a rerun
    other_seed = common.eval_generators(1, items[:1])[0]
    assert not torch.equal(noise[0], torch.randn(3, generator=other_seed))


def test_table_markdown_and_grids_are_written(tiny_model, data_root, tmp_path, fakes):
    row = run(tiny_model, data_root, tmp_path, "--name", "base", "--grid", "2")
    run(tiny_model, data_root, tmp_path, "--name", "other", "--cfg", "1.0", "--grid", "2")
    run(tiny_model, data_root, tmp_path, "--name", "base", "--grid", "2")  # replaces its row
    table = json.loads((tmp_path / "table.json").read_text())
    assert [r["model"] for r in table["rows"]] == ["base", "other"]
    saved = table["rows"][0]
    assert {"model", "geneval", "ocr", "pickscore", "deqa", "average", "stderr", "geneval_tags", "n"} <= set(saved)
    assert saved["n"] == {"geneval": 4, "ocr": 3, "pickscore": 3, "deqa": 10}
    assert set(saved["geneval_tags"]) == {"colors", "counting"}
    assert saved["geneval"] == pytest.approx(np.mean(list(saved["geneval_tags"].values())))
    assert saved["average"] == pytest.approx(rewards.paper_average(geneval=saved["geneval"], ocr=saved["ocr"],
                                                                   pickscore=saved["pickscore"], deqa=saved["deqa"]))
    assert 1 <= saved["deqa"] <= 5 and 0 <= saved["pickscore"] <= 26  # fake_deqa 1-5, fake_pickscore x 26
    assert saved["geneval"] == row["geneval"] and saved["settings"]["steps"] == 2
    md = (tmp_path / "table.md").read_text()
    assert md.startswith("| Model | GenEval | OCR | DeQA | PickScore | Average |")
    assert f"| base | {saved['geneval']:.3f} ± {saved['stderr']['geneval']:.3f} |" in md and "| other |" in md
    from PIL import Image
    for task in ("geneval", "ocr", "pickscore"):
        for name in ("base", "other"):
            assert Image.open(tmp_path / "grids" / task / f"{name}.png").size == (2 * 128, 128)  # 8 px x 16


def test_resume_samples_only_missing_images_and_gives_the_same_numbers(tiny_model, data_root, tmp_path, fakes,
                                                                       count_images):
    run(tiny_model, data_root, tmp_path / "a", "--limit", "1", "--grid", "0")
    assert count_images["images"] == 3
    resumed = run(tiny_model, data_root, tmp_path / "a", "--limit", "2", "--grid", "0")
    assert count_images["images"] == 3 + 3  # only the second prompt of each task
    again = run(tiny_model, data_root, tmp_path / "a", "--limit", "2", "--grid", "0")
    assert count_images["images"] == 6 and again == resumed
    cache = tmp_path / "a" / "cache" / "base" / "ocr.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][:20])  # killed while writing the second line
    assert run(tiny_model, data_root, tmp_path / "a", "--limit", "2", "--grid", "0") == resumed
    assert count_images["images"] == 7
    assert run(tiny_model, data_root, tmp_path / "a", "--limit", "2", "--grid", "0") == resumed
    assert count_images["images"] == 7 and len(cache.read_text().splitlines()) == 2
    fresh = run(tiny_model, data_root, tmp_path / "b", "--limit", "2", "--grid", "0")
    assert fresh == resumed and count_images["images"] == 13
    cache.write_text(cache.read_text().replace('\\"ab\\"', '\\"xy\\"'))  # the prompt file changed since
    assert run(tiny_model, data_root, tmp_path / "a", "--limit", "2", "--grid", "0") == resumed
    assert count_images["images"] == 14
    run(tiny_model, data_root, tmp_path / "a", "--limit", "2", "--grid", "0", "--steps", "3")
    assert count_images["images"] == 20  # other settings: the old cache is started over


def test_two_models_see_the_same_noise(tiny_model, data_root, tmp_path, fakes, count_images):
    tr = common.load_pipeline(tiny_model).transformer
    tr.add_adapter(common.lora_config(4, 8), "student")
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    common.save_lora(tr, "student", str(tmp_path / "lora"))
    base = run(tiny_model, data_root, tmp_path, "--limit", "2", "--grid", "0")
    noise = list(count_images["noise"])
    tuned = run(tiny_model, data_root, tmp_path, "--limit", "2", "--grid", "0", "--adapters", str(tmp_path / "lora"),
                "--name", "tuned")
    assert len(noise) == 6 and all(torch.equal(a, b) for a, b in zip(noise, count_images["noise"][6:]))
    assert tuned["ocr"] != base["ocr"]  # the adapter is active
    names = [r["model"] for r in json.loads((tmp_path / "table.json").read_text())["rows"]]
    assert names == ["base", "tuned"]


def test_limit_and_images_per_prompt(tiny_model, data_root, tmp_path, fakes):
    row = run(tiny_model, data_root, tmp_path, "--limit", "2", "--images-per-prompt", "2", "--grid", "0",
              "--tasks", "ocr,geneval")
    assert row["n"] == {"geneval": 4, "ocr": 4, "deqa": 8} and "pickscore" not in row and row.get("average") is None
    texts = [json.loads(line)["prompt"] for line in (tmp_path / "cache" / "base" / "ocr.jsonl").read_text().splitlines()]
    assert sorted(set(texts)) == ['a sign says "ab"', 'a sign says "cat"']
    assert "| base |" in (tmp_path / "table.md").read_text()


def _write_rows(out_dir, worker, n):
    for k in range(n):
        evaluate.write_table(out_dir, {"model": f"w{worker}-{k}", "geneval": 0.5})


def test_evaluations_finishing_together_keep_every_row(tmp_path):
    """runs/toy.sh evaluates two models at once into one folder: no row may be lost."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_write_rows, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join()
    assert [p.exitcode for p in workers] == [0] * 4
    with open(tmp_path / "table.json") as f:
        names = sorted(r["model"] for r in json.load(f)["rows"])
    assert names == sorted(f"w{w}-{k}" for w in range(4) for k in range(25))
    assert (tmp_path / "table.md").read_text().count("| w") == 100


def _write_cache(out, name, geneval, ocr, prompts=None):
    folder = out / "cache" / name
    folder.mkdir(parents=True)
    lines = [{"i": i, "j": 0, "prompt": f"g{i}", "tag": "ab"[i % 2], "scores": {"geneval": c, "deqa": 3.0 + c}}
             for i, c in enumerate(geneval)]
    (folder / "geneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    lines = [{"i": i, "j": 0, "prompt": (prompts or {}).get(i, f"o{i}"), "scores": {"ocr": s}} for i, s in enumerate(ocr)]
    (folder / "ocr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"i": 9, "j"')  # killed mid-line


def test_compare_judges_two_rows_prompt_by_prompt(tmp_path):
    rng = np.random.default_rng(0)
    hard = rng.random(40)  # what the prompts share: both rows find the same prompts hard
    ocr_a, ocr_b = hard + 0.05 + 0.01 * rng.standard_normal(40), hard
    gen_a, gen_b = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    _write_cache(tmp_path, "A", gen_a, ocr_a.tolist())
    _write_cache(tmp_path, "B", gen_b, ocr_b.tolist())
    row = evaluate.main(evaluate.parse_args(["--out", str(tmp_path), "--compare", "A", "B"]))
    d = ocr_a - ocr_b
    assert row["model"] == "A - B"
    assert row["ocr"] == pytest.approx(d.mean()) and row["stderr"]["ocr"] == pytest.approx(d.std(ddof=1) / np.sqrt(40))
    assert row["stderr"]["ocr"] < 0.01 < np.std(ocr_a, ddof=1) / np.sqrt(40)  # far below the unpaired error
    by_tag = [np.mean(np.subtract(gen_a, gen_b)[t::2]) for t in (0, 1)]  # tags a, b alternate
    assert row["geneval"] == pytest.approx(np.mean(by_tag)) == pytest.approx(1 / 3)
    assert row["deqa"] == pytest.approx(2 / 6)  # DeQA exists on GenEval images only here
    _write_cache(tmp_path, "C", gen_b, ocr_b.tolist(), prompts={3: "another prompt"})
    with pytest.raises(ValueError, match="different prompt files"):
        evaluate.paired_difference(str(tmp_path), "A", "C")
    with pytest.raises(FileNotFoundError, match="evaluate it first"):
        evaluate.paired_difference(str(tmp_path), "A", "missing")


def test_summary_is_genevals_mean_over_tags_with_stderr_over_prompts():
    results = [{"task": "geneval", "i": i, "tag": tag, "scores": {"geneval": c}}
               for i, (tag, c) in enumerate([("a", 1.0), ("a", 0.0), ("a", 1.0), ("b", 1.0), ("b", 1.0)])]
    results += [{"task": "ocr", "i": i // 2, "scores": {"ocr": s}} for i, s in enumerate([0.2, 0.4, 0.6, 1.0])]
    row = rewards.summarize(results)
    assert row["geneval"] == pytest.approx((2 / 3 + 1) / 2) and row["geneval_tags"] == {"a": 2 / 3, "b": 1.0}
    se_a = np.std([1, 0, 1], ddof=1) / np.sqrt(3)
    assert row["stderr"]["geneval"] == pytest.approx(np.sqrt(se_a**2 + 0) / 2)
    assert row["ocr"] == pytest.approx(0.55) and row["n"]["ocr"] == 4
    assert row["stderr"]["ocr"] == pytest.approx(np.std([0.3, 0.8], ddof=1) / np.sqrt(2))  # prompts, not images


def test_toy_metrics_are_on_the_tables_scale():
    import toy
    images = np.random.RandomState(0).randint(0, 256, (2, toy.RESOLUTION, toy.RESOLUTION, 3), dtype=np.uint8)
    color, shape = next(iter(toy.COLORS)), toy.SHAPES[0]
    row = {"tag": "colors", "include": [{"class": shape, "count": 1, "color": color}], "prompt": f"a photo of a {color} {shape}"}
    metric = lambda column: rewards.load_metric(toy.METRICS[column], scales=toy.METRIC_SCALES)
    geneval = metric("geneval")(images, [row["prompt"]] * 2, [row] * 2)
    strict = toy.geneval_details(images, [row["prompt"]] * 2, [row] * 2)
    assert [(r["tag"], r["score"]) for r in geneval] == [("colors", float(d["correct"]))
                                                         for d in strict]
    deqa = metric("deqa")(images, ["a"] * 2, None)
    assert [r["score"] for r in deqa] == pytest.approx(toy.reward_deqa(images))  # DeQA's 1-5
    prompt = f"a {color} {shape} at night, highly detailed"  # the toy's own words
    pick = metric("pickscore")(images, [prompt] * 2, None)
    assert [r["score"] for r in pick] == pytest.approx(26 * toy.reward_pickscore(images, [prompt] * 2))


def test_the_model_folder_names_its_metrics(tiny_model, data_root, tmp_path, fakes):
    """flow_opd.json's "metrics" and "metric_scales" (how the toy world names its own) replace the
    paper's defaults: the same table as passing them with --metrics and a TABLE_SCALE entry."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    info = json.loads((model / "flow_opd.json").read_text())
    specs = dict(item.split("=") for item in FAKE_METRICS.split(","))
    info.update(metrics=specs, metric_scales={"fake_pickscore": 26.0})
    (model / "flow_opd.json").write_text(json.dumps(info))
    del rewards.TABLE_SCALE["fake_pickscore"]  # only the model folder scales it (until teardown)
    named = evaluate.main(evaluate.parse_args(["--model", str(model), "--data-root", data_root,
                                               "--out", str(tmp_path / "named"), "--steps", "2",
                                               "--batch-size", "4"]))
    unscaled = run(tiny_model, data_root, tmp_path / "unscaled")
    rewards.TABLE_SCALE["fake_pickscore"] = 26.0
    given = run(tiny_model, data_root, tmp_path / "given")
    assert named["metrics"] == specs and given["metrics"] == specs
    for column in ("geneval", "ocr", "deqa", "pickscore", "average"):
        assert named[column] == given[column], column
    assert unscaled["pickscore"] > 0
    assert named["pickscore"] == pytest.approx(26 * unscaled["pickscore"])


def test_bad_input_names_the_problem(tiny_model, data_root, tmp_path, fakes):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        run(tiny_model, data_root, tmp_path, "--tasks", "ocr,nope")
    with pytest.raises(FileNotFoundError, match="--data-root .* does not exist"):
        run(tiny_model, str(tmp_path / "missing"), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter .* does not exist"):
        run(tiny_model, data_root, tmp_path, "--adapters", str(tmp_path / "no-lora"))
    with pytest.raises(ValueError, match="--images-per-prompt must be a positive number"):
        run(tiny_model, data_root, tmp_path, "--images-per-prompt", "0")
    with pytest.raises(ValueError, match="--metrics item 'ocr'"):
        run(tiny_model, data_root, tmp_path, "--metrics", "ocr")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        run(tiny_model, data_root, tmp_path, "--metrics", "ocr=nope")
    assert not (tmp_path / "table.json").exists()


# ----------------------------------------------------------------------------- runs/sd35m.sh


def dry_run(tmp_path, **env):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "OUT": str(tmp_path / "out"), "GENEVAL_URL": "http://127.0.0.1:9",
           "DEQA_URL": "http://127.0.0.1:9", **env}
    return subprocess.run(["bash", os.path.join(ROOT, "runs", "sd35m.sh"), "--dry-run"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.fixture
def reward_servers():
    """A GenEval and a DeQA reward server on free local ports, answering as the real ones:
    ({variable: url}, {server: what it was sent})."""
    import threading
    import reward_server
    seen = {}

    def geneval(images, prompts, metadata):
        seen["geneval"] = (images.shape, prompts, metadata)
        n = len(images)
        return {"reward": [0.5] * n, "correct": [True] * n, "tag": ["single_object"] * n}

    def deqa(images, prompts, metadata):
        seen["deqa"] = images.shape
        return [0.8] * len(images)

    servers = [reward_server.make_server(fn, port=0) for fn in (geneval, deqa)]
    for server in servers:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
    urls = {name: f"http://127.0.0.1:{server.server_address[1]}"
            for name, server in zip(("GENEVAL_URL", "DEQA_URL"), servers)}
    yield urls, seen
    for server in servers:
        server.shutdown()
        server.server_close()


def test_sd35m_dry_run_checks_folders_and_prints_the_plan(tmp_path, reward_servers):
    data = tmp_path / "dataset"
    row = {"prompt": "a photo of a cat", "tag": "single_object"}
    for task, files in [("geneval", ["train_metadata.jsonl", "test_metadata.jsonl"]),
                        ("ocr", ["train.txt", "test.txt"]),
                        ("pickscore", ["train.txt", "test.txt"])]:
        os.makedirs(data / task)
        for name in files:
            (data / task / name).write_text(json.dumps(row) + "\n")
    folders = {}
    for name, marker in [("model", "model_index.json"),
                         ("teacher-deqa", "pytorch_lora_weights.safetensors"),
                         ("geneval", "adapter_config.json"), ("ocr", "adapter_config.json"),
                         ("pickscore", "adapter_config.json")]:
        os.makedirs(tmp_path / name)
        (tmp_path / name / marker).write_text("{}")
        folders[name] = str(tmp_path / name)
    urls, seen = reward_servers
    ready = dict(DATA_ROOT=str(data), MODEL=folders["model"], DEQA_TEACHER=folders["teacher-deqa"],
                 GENEVAL_TEACHER=folders["geneval"], OCR_TEACHER=folders["ocr"],
                 PICKSCORE_TEACHER=folders["pickscore"], CHECK_GPUS="0", **urls)
    ok = dry_run(tmp_path, **ready)
    assert ok.returncode == 0, ok.stderr
    plan = ok.stdout
    for expected in [folders["geneval"], folders["ocr"], folders["pickscore"], "opd.py",
                     "--init merge", "--mar 0.1", f"--mar-teacher {folders['teacher-deqa']}",
                     "--nproc_per_node 8", "--max-sequence-length 128", "evaluate.py", "0.63",
                     "21.64", "23.08", "0.90"]:
        assert expected in plan, expected
    assert plan.count("--max-sequence-length 128") == 4  # OPD and the three evaluations
    assert seen["geneval"] == ((1, 512, 512, 3), [row["prompt"]], [row])  # one image each, as a run
    assert seen["deqa"] == (1, 512, 512, 3)
    assert not (tmp_path / "out").exists()  # a dry run creates nothing

    multi = dry_run(tmp_path, **ready, NNODES="2", MASTER_ADDR="node0")
    assert multi.returncode == 0 and "--nnodes 2" in multi.stdout
    assert "--rdzv_endpoint node0:29500" in multi.stdout

    bad = dry_run(tmp_path, DATA_ROOT=str(tmp_path / "nodata"), DEQA_TEACHER=str(tmp_path / "nodeqa"),
                  OCR_TEACHER=str(tmp_path / "noocr"), NPROC_PER_NODE="999")
    assert bad.returncode != 0
    problems = bad.stderr.splitlines()
    for expected in ["nodata", "nodeqa", "teacher_grpo.py", "noocr",
                     "github.com/yifan123/flow_grpo",
                     "GPU(s) on this node, the launch asks for 999",
                     "MODEL: stabilityai/stable-diffusion-3.5-medium is not in the local cache and "
                     "the hub cannot be reached",
                     "GENEVAL_TEACHER: jieliu/SD3.5M-FlowGRPO-GenEval is not in the local cache",
                     "GENEVAL_URL: reward server http://127.0.0.1:9 failed",
                     "DEQA_URL: reward server"]:
        assert any(expected in line for line in problems), expected  # every problem at once
    assert "opd.py" not in bad.stdout


def ddp_rank(rank, args, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    evaluate.main(evaluate.parse_args(args))


def test_ddp_shards_give_the_single_process_table(tiny_model, data_root, tmp_path, fakes, monkeypatch):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    args = ["--model", str(tiny_model), "--data-root", data_root, "--steps", "2", "--metrics", FAKE_METRICS,
            "--batch-size", "2", "--grid", "2", "--device", "cpu", "--threads", "1"]
    # forked ranks inherit the fake rewards and the imported modules (torchrun would re-import everything)
    mp.start_processes(ddp_rank, args=(args + ["--out", str(tmp_path / "ddp")], port), nprocs=2, start_method="fork")
    single = run(tiny_model, data_root, tmp_path / "single", "--batch-size", "2", "--grid", "2")
    ddp = json.loads((tmp_path / "ddp" / "table.json").read_text())["rows"][0]
    assert ddp == json.loads(json.dumps(single))
    cached = (tmp_path / "ddp" / "cache" / "base" / "geneval.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["i"] for line in cached) == [0, 1, 2, 3]
