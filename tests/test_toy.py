"""The toy world: a real diffusers pipeline, Flow-GRPO's data layout, and rewards that judge toy images exactly."""
import json
import os
import time

import numpy as np
import pytest
import torch

import common
import toy


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory):
    """One --quick world per session: (folder, world.json contents, build seconds)."""
    out = str(tmp_path_factory.mktemp("toy_world"))
    start = time.perf_counter()
    world = toy.main(toy.parse_args(["--out", out, "--quick"]))
    return out, world, time.perf_counter() - start


def ground_truth(task, n, seed=0, tag=None):
    rng = np.random.default_rng(seed)
    prompts, metadata, images = [], [], []
    for _ in range(n):
        prompt, row = toy.sample_prompt(task, rng, tag)
        prompts.append(prompt)
        metadata.append(row)
        images.append(toy.render(task, prompt, row, rng))
    return np.stack(images), prompts, metadata


def test_quick_world_builds_within_budget(quick_world):
    out, world, seconds = quick_world
    assert seconds < 180  # ~25 s on an idle 2-core machine; loose, so a busy CI machine does not fail it
    assert os.path.isfile(os.path.join(out, "world.json"))
    start = time.perf_counter()
    again = toy.main(toy.parse_args(["--out", out, "--quick"]))  # cached: nothing is rebuilt
    assert time.perf_counter() - start < 5
    assert again == world


def test_pipeline_round_trips_and_samples_with_stock_diffusers(quick_world, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    out, _, _ = quick_world
    base = os.path.join(out, "base")
    with open(os.path.join(base, "flow_opd.json")) as f:
        assert json.load(f) == {"max_sequence_length": 1, "resolution": 32, "metrics": {
            "geneval": "toy:reward_geneval", "ocr": "toy:reward_ocr",
            "pickscore": "toy:reward_pickscore", "deqa": "toy:reward_deqa"},
            "metric_scales": {"toy:reward_pickscore": 26.0}}
    pipe = StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(tmp_path / "copy"))
    copy = common.load_pipeline(str(tmp_path / "copy"))
    images = []
    for p in (pipe, copy):
        p.set_progress_bar_config(disable=True)
        images.append(p(prompt=["a photo of a red bar", 'a sign that says "42"'], num_inference_steps=3,
                        guidance_scale=4.5, height=32, width=32, max_sequence_length=1, output_type="np",
                        generator=[torch.Generator().manual_seed(i) for i in range(2)]).images)
    assert images[0].shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(images[0], images[1])


def test_vae_is_an_exact_identity(quick_world):
    pipe = common.load_pipeline(os.path.join(quick_world[0], "base"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.sample()
        decoded = pipe.vae.decode(latents).sample
    assert (latents - x).abs().max() < 1e-5
    assert (decoded - x).abs().max() < 1e-5


def test_tokenizer_keeps_every_toy_word_whole(quick_world):
    pipe = common.load_pipeline(os.path.join(quick_world[0], "base"))
    for word in toy.vocabulary():
        ids = pipe.tokenizer(word).input_ids
        assert len(ids) == 3, (word, pipe.tokenizer.convert_ids_to_tokens(ids))  # <bos> word <eos>
    ids = pipe.tokenizer('a sign that says "407"').input_ids  # CLIP splits digits apart
    assert pipe.tokenizer.convert_ids_to_tokens(ids)[6:9] == ["4</w>", "0</w>", "7</w>"]


def test_data_root_has_flow_grpo_layout(quick_world):
    root = os.path.join(quick_world[0], "data")
    for split in ("pretrain", "train", "test", "ood"):
        for path in ("geneval/%s_metadata.jsonl", "ocr/%s.txt", "pickscore/%s.txt"):
            assert os.path.isfile(os.path.join(root, path % split))
    prompts = common.load_prompts(root, ["geneval", "ocr", "pickscore"], "test")
    assert [sum(p.task == t for p in prompts) for t in toy.TASKS] == [512, 256, 256]  # --geneval-test-size
    rows = [p.metadata for p in prompts if p.task == "geneval"]
    assert {r["tag"] for r in rows} == set(toy.TAGS)
    for r in rows:
        assert set(r) <= {"tag", "include", "exclude", "prompt"} and r["include"]
        assert all(req["class"] in toy.SHAPES for req in r["include"])
        if r["tag"] == "counting":
            assert r["exclude"] == [{"class": r["include"][0]["class"], "count": r["include"][0]["count"] + 1}]
    assert all(p.text.count('"') == 2 for p in prompts if p.task == "ocr")
    with open(os.path.join(root, "geneval", "test_metadata.jsonl")) as f:
        first = f.readline()
    toy.write_data(os.path.join(quick_world[0], "again"), 2000, 256, 0)  # the same seed writes the same files
    with open(os.path.join(quick_world[0], "again", "geneval", "test_metadata.jsonl")) as f:
        assert f.readline() == first


def held_out_texts():
    """The held-out combinations as the words a prompt would carry (independent of toy.held_out)."""
    h = toy.HELD_OUT
    texts = [f"{c} {s}" for c, s in h["color_shape"]]
    texts += [f"{toy.NUMBERS[n]} {s}s" for n, s in h["count_shape"]]
    texts += [f"of a {a} and a {b}" for a, b in h["two_object"]]
    texts += [f"a {a} {rel} a {b}" for a, rel, b in h["position"]]
    return texts + [f'"{d}"' for d in h["digits"]]


def test_ood_split_holds_out_its_combinations_from_every_training_split(tmp_path):
    root = str(tmp_path)
    toy.write_data(root, 600, 128, 0, 192, ood_size=96, geneval_ood_size=96)
    texts = held_out_texts()
    for split in ("train", "test"):
        prompts = common.load_prompts(root, toy.TASKS, split)
        assert len(prompts) == (600 * 3 if split == "train" else 192 + 2 * 128)
        assert not [p.text for p in prompts if any(t in p.text for t in texts)]
    ood = common.load_prompts(root, toy.TASKS, "ood")
    assert [sum(p.task == t for p in ood) for t in toy.TASKS] == [96, 96, 96]
    assert all(any(t in p.text for t in texts) for p in ood)
    seen = {t for p in ood for t in texts if t in p.text}
    assert seen == set(texts)  # every held-out combination is asked for
    assert {p.metadata["tag"] for p in ood if p.task == "geneval"} == set(toy.OOD_TAGS)
    # the base's pretraining prompts contain them, as a web-scale base model's data would
    pretrain = common.load_prompts(root, toy.TASKS, "pretrain")
    assert {t for p in pretrain for t in texts if t in p.text} == set(texts)
    with open(os.path.join(root, "ood.json")) as f:
        meta = json.load(f)
    assert meta["held_out"]["digits"] == toy.HELD_OUT["digits"]
    assert meta["prompts"]["ood"] == {"geneval": 96, "ocr": 96, "pickscore": 96}


@pytest.mark.parametrize("task", toy.TASKS)
def test_ood_prompts_are_scored_like_in_domain_ones(task, tmp_path):
    """Ground-truth renders of held-out prompts earn full reward; blanks earn none."""
    toy.write_data(str(tmp_path), 60, 30, 0, ood_size=40, geneval_ood_size=40)
    prompts = common.load_prompts(str(tmp_path), [task], "ood")
    rng = np.random.default_rng(0)
    metadata = [p.metadata or None for p in prompts]
    images = np.stack([toy.render(task, p.text, m, rng) for p, m in zip(prompts, metadata)])
    texts = [p.text for p in prompts]
    reward = toy.TOY_REWARDS[task]
    assert reward(images, texts, metadata).min() == 1.0
    assert reward(np.full_like(images, 240), texts, metadata).mean() < 0.05
    if task == "geneval":
        assert all(r["correct"] for r in toy.geneval_details(images, texts, metadata))


@pytest.mark.parametrize("task", toy.TASKS)
def test_rewards_score_ground_truth_at_max_and_blank_or_noise_at_min(task):
    images, prompts, metadata = ground_truth(task, 60)
    metadata = metadata if task == "geneval" else None
    reward = toy.TOY_REWARDS[task]
    assert reward(images, prompts, metadata).min() == 1.0
    assert toy.reward_deqa(images).min() > 4.9
    blank = np.full_like(images, 240)
    noise = np.random.default_rng(1).integers(0, 256, images.shape).astype(np.uint8)
    for bad in (blank, noise):
        assert reward(bad, prompts, metadata).mean() < 0.05
        assert toy.reward_deqa(bad).max() == 1.0


def test_geneval_partial_credit_and_strict_correctness():
    # three towers against the prompt "four towers": Flow-GRPO's credit 1 - |4 - 3| / 4, GenEval says wrong
    three = {"tag": "counting", "include": [{"class": "tower", "count": 3}],
             "exclude": [{"class": "tower", "count": 4}]}
    four = {"tag": "counting", "include": [{"class": "tower", "count": 4}],
            "exclude": [{"class": "tower", "count": 5}]}
    images = toy.render_geneval(three)[None]
    (details,) = toy.geneval_details(images, ["a photo of four towers"], [four])
    assert details == {"reward": 0.75, "correct": False, "tag": "counting"}
    (details,) = toy.geneval_details(images, ["a photo of three towers"], [three])
    assert details == {"reward": 1.0, "correct": True, "tag": "counting"}
    # a red tower where a blue one was asked for: the count earns its half, the colour nothing
    row = {"tag": "colors", "include": [{"class": "tower", "count": 1, "color": "blue"}]}
    image = toy.render_geneval(dict(row, include=[dict(row["include"][0], color="red")]))
    assert toy.geneval_details(image[None], ["a photo of a blue tower"], [row])[0]["reward"] == 0.5


def test_geneval_position_follows_geneval_relations():
    assert toy.relative_position((0, 10, 8, 18), (20, 10, 28, 18)) == {"left of"}
    assert toy.relative_position((10, 0, 18, 8), (10, 20, 18, 28)) == {"above"}
    assert toy.relative_position((10, 10, 18, 18), (11, 11, 19, 19)) == set()  # overlapping: no relation
    row = {"tag": "position", "include": [{"class": "square", "count": 1},
                                          {"class": "tower", "count": 1, "position": ["left of", 0]}]}
    image = np.full((32, 32, 3), 240, np.uint8)
    image[toy.shape_mask("tower", (2, 10, 10))] = toy.COLORS["red"]
    image[toy.shape_mask("square", (20, 10, 10))] = toy.COLORS["blue"]
    assert toy.geneval_details(image[None], ["p"], [row])[0]["correct"]
    swapped = dict(row, include=[row["include"][0], dict(row["include"][1], position=["right of", 0])])
    assert toy.geneval_details(image[None], ["p"], [swapped])[0] == {"reward": 2 / 3, "correct": False,
                                                                      "tag": "position"}


def test_ocr_reward_is_the_real_formula_over_the_glyph_reader():
    image = toy.render_ocr('a sign that says "47"')[None]
    assert toy.read_text(image[0]) == "47"
    assert toy.reward_ocr(image, ['a sign that says "47"'])[0] == 1.0
    assert toy.reward_ocr(image, ['a sign that says "49"'])[0] == pytest.approx(0.5)  # 1 - lev / len
    assert toy.reward_ocr(image, ['a sign that says "7"'])[0] == 1.0  # a substring counts as read
    # the reader reads shape only: the font's colours (one per digit) or black ink read the same
    colours = {tuple(c) for c in image[0].reshape(-1, 3).tolist()} - {toy.BACKGROUND}
    assert colours == {toy.INKS["4"], toy.INKS["7"]}
    black = toy.render_ocr('a sign that says "47"', inks=dict.fromkeys(toy.INKS, (25, 25, 25)))
    assert toy.read_text(black) == "47"


def test_pickscore_pays_noise_as_detail_while_deqa_punishes_it():
    """The designed conflict: a flat subject lacks "detail"; adding pixel noise buys it back and costs DeQA."""
    prompt = "a blue square in daylight, highly detailed"
    flat = np.full((32, 32, 3), 240, np.uint8)
    mask = toy.shape_mask("square", (7, 7, 18))
    flat[mask] = toy.COLORS["blue"]
    noisy = flat.astype(int)
    noisy[mask] += np.random.default_rng(0).integers(-45, 46, (mask.sum(), 3))
    noisy = noisy.clip(0, 255).astype(np.uint8)
    striped = toy.render_pickscore(prompt, np.random.default_rng(0))
    pick = toy.reward_pickscore(np.stack([flat, noisy, striped]), [prompt] * 3)
    deqa = toy.reward_deqa(np.stack([flat, noisy, striped]))
    assert pick[0] < 0.1 and pick[1] > 0.9 and pick[2] == 1.0
    assert deqa[0] == deqa[2] == 5.0 and deqa[1] < 4.5


def test_region_helpers_on_hand_drawn_masks():
    # two diagonal pixels: two regions 4-connected, one 8-connected; numbered in raster order
    m = np.zeros((5, 5), bool)
    m[0, 3] = m[1, 2] = m[4, 0] = True
    labels, n = toy.label(m)
    assert n == 3 and labels[0, 3] == 1 and labels[1, 2] == 2 and labels[4, 0] == 3
    labels, n = toy.label(m, diagonal=True)
    assert n == 2 and labels[0, 3] == labels[1, 2] == 1
    assert list(toy.region_sizes(labels, n)) == [2, 1]
    # a ring: its hole is filled, a notch open to the border is not
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    assert toy.fill_holes(ring)[1:6, 1:6].all() and toy.fill_holes(ring).sum() == 25
    cup = ring.copy()
    cup[0:3, 3] = False  # cut the ring open at the top: the inside reaches the border
    assert toy.fill_holes(cup).sum() == cup.sum()
    # erosion of a 3 x 4 block leaves its 1 x 2 inside; pixels on the image edge never survive
    block = np.zeros((5, 6), bool)
    block[1:4, 1:5] = True
    assert np.argwhere(toy.erode(block)).tolist() == [[2, 2], [2, 3]]
    assert not toy.erode(np.ones((3, 3), bool))[0].any()


def test_tokenizer_ids_do_not_depend_on_the_bpe_trainers_tie_breaking(tmp_path):
    # the trainer breaks ties in hash order (4 trainings here gave 4 different vocab.json files)
    files = []
    for i in range(3):
        toy.train_tokenizer(str(tmp_path / str(i)), 16)
        files.append((tmp_path / str(i) / "vocab.json").read_bytes())
    assert files[0] == files[1] == files[2]
