"""cold_start.py: the merge is the weighted sum of the teachers' updates (checked on the LoRA factors,
against the SVD optimum, and inside a diffusers pipeline against weights edited by hand); SFT samples
the routed teachers, keeps the best of N, caches the samples, trains and resumes exactly."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import cold_start
import common
from conftest import ROOT


def make_teacher(transformer, name, folder, rank, alpha, fmt, targets=None, seed=0):
    """A random LoRA teacher saved as a PEFT folder (the released teachers' format) or a diffusers folder.
    Returns its unscaled state dict and its scale alpha / r."""
    transformer.add_adapter(common.lora_config(rank, alpha, targets), name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if f".{name}." in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    state = {k: v.clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}
    os.makedirs(folder, exist_ok=True)
    if fmt == "peft":
        prefixed = {f"base_model.model.{k}": v for k, v in state.items()}
        save_file(prefixed, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
                       "target_modules": list(targets or common.LORA_TARGETS)}, f)
    else:
        common.save_lora(transformer, name, folder)
    return state, alpha / rank


@pytest.fixture(scope="module")
def teachers(tiny_model, tmp_path_factory):
    """Two teachers of different ranks, alphas and formats, plus one on other modules: {name: (path, state, scale)}."""
    root = tmp_path_factory.mktemp("teachers")
    transformer = common.load_pipeline(tiny_model).transformer
    specs = {"peft": (2, 4, "peft", None), "diffusers": (3, 12, "diffusers", None),
             "qk_only": (2, 2, "diffusers", ["to_q", "to_k"])}
    out = {}
    for seed, (name, (rank, alpha, fmt, targets)) in enumerate(specs.items()):
        path = str(root / name)
        state, scale = make_teacher(transformer, name, path, rank, alpha, fmt, targets, seed)
        out[name] = (path, state, scale)
    return out


def weighted_updates(teachers, names, weights):
    """{module: sum_k w_k scale_k B_k A_k} from the teachers' raw factors."""
    updates = {}
    for name, w in zip(names, weights):
        _, state, scale = teachers[name]
        for key in (k for k in state if k.endswith(".lora_A.weight")):
            module = key[:-len(".lora_A.weight")]
            delta = w * scale * state[key.replace("lora_A", "lora_B")].double() @ state[key].double()
            updates[module] = updates.get(module, 0) + delta
    return updates


def test_merged_update_is_the_weighted_sum_of_teacher_updates(teachers):
    paths = {"geneval": teachers["peft"][0], "ocr": teachers["diffusers"][0]}
    state, config, info = common.merge_teachers(paths, weights=[0.7, 0.3])
    expected = weighted_updates(teachers, ["peft", "diffusers"], [0.7, 0.3])
    assert config["r"] == config["lora_alpha"] == 5 and info["stacked_rank"] == 5 and info["relative_error"] == 0
    assert set(config["target_modules"]) == set(common.LORA_TARGETS)
    assert len(expected) > 0 and {k[:-len(".lora_A.weight")] for k in state if "lora_A" in k} == set(expected)
    for module, delta in expected.items():
        merged = state[f"{module}.lora_B.weight"].double() @ state[f"{module}.lora_A.weight"].double()
        assert torch.allclose(merged, delta, atol=1e-6 * delta.abs().max().item())
    module = next(iter(expected))
    with_base = {"geneval": paths["geneval"], "ocr": "base"}
    for teacher_paths, names in [(paths, ["peft", "diffusers"]), (with_base, ["peft"])]:
        equal, _, _ = common.merge_teachers(teacher_paths)  # default: 1/K each; 'base' adds Delta W = 0
        half = weighted_updates(teachers, names, [0.5, 0.5])[module]
        assert torch.allclose(equal[f"{module}.lora_B.weight"].double() @ equal[f"{module}.lora_A.weight"].double(),
                              half, atol=1e-6 * half.abs().max().item())


def test_merge_rank_reports_the_optimal_truncation_error(teachers):
    paths = {"geneval": teachers["peft"][0], "ocr": teachers["diffusers"][0]}
    state, config, info = common.merge_teachers(paths, rank=2)
    full = weighted_updates(teachers, ["peft", "diffusers"], [0.5, 0.5])
    tail = total = achieved = 0.0
    for module, delta in full.items():
        s = torch.linalg.svdvals(delta)  # Eckart-Young: the best rank-2 error is the tail of the spectrum
        tail += s[2:].pow(2).sum().item()
        total += s.pow(2).sum().item()
        B, A = state[f"{module}.lora_B.weight"].double(), state[f"{module}.lora_A.weight"].double()
        assert A.shape[0] == 2
        achieved += (delta - B @ A).pow(2).sum().item()
    assert config["r"] == config["lora_alpha"] == 2 and info["rank"] == 2
    assert info["relative_error"] == pytest.approx(np.sqrt(tail / total), rel=1e-4)
    assert np.sqrt(achieved / total) == pytest.approx(np.sqrt(tail / total), rel=1e-4)
    assert info["relative_error"] > 0.01


def test_merged_lora_loads_in_the_pipeline_as_the_summed_deltas(tiny_model, teachers, tmp_path):
    out = str(tmp_path / "merge")
    teacher_arg = f"geneval={teachers['peft'][0]},ocr={teachers['diffusers'][0]}"
    info = cold_start.main(cold_start.parse_args(["--init", "merge", "--teachers", teacher_arg,
                                                  "--weights", "0.7,0.3", "--out", out]))
    with open(os.path.join(out, "merge.json")) as f:
        assert json.load(f) == info
    pipe = common.load_pipeline(tiny_model)
    reference = copy.deepcopy(pipe.transformer)  # independent: the summed deltas added to the weights by hand
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for module, delta in weighted_updates(teachers, ["peft", "diffusers"], [0.7, 0.3]).items():
            modules[module].weight += delta.float()
    cond, _ = common.encode_prompts(pipe, ["a red cat"], max_sequence_length=1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = common.velocity(pipe.transformer, x, 0.6, *cond)
        expected = common.velocity(reference, x, 0.6, *cond)
        pipe.load_lora_weights(os.path.join(out, "final"))
        loaded = common.velocity(pipe.transformer, x, 0.6, *cond)
        student = common.load_pipeline(tiny_model).transformer  # what opd.py --init does
        common.load_lora(student, os.path.join(out, "final"), "student")
        ours = common.velocity(student, x, 0.6, *cond)
    assert not torch.allclose(base, expected, atol=1e-2)
    assert torch.allclose(loaded, expected, atol=1e-5)
    assert torch.allclose(ours, expected, atol=1e-5)


def write_data_root(root):
    for task, lines in {"objects": ["a red cat", "a blue dog", "a red dog"],
                        "signs": ['a sign says "cat"', 'a sign says "dog"']}.items():
        os.makedirs(os.path.join(root, task))
        with open(os.path.join(root, task, "train.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


def sft_flags(tiny_model, teachers, root, out, *extra):
    teacher_arg = f"objects={teachers['peft'][0]},signs={teachers['diffusers'][0]}"
    return ["--init", "sft", "--model", tiny_model, "--teachers", teacher_arg, "--data-root", root, "--out", out,
            "--steps", "2", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--batch-size", "2", "--max-steps", "2",
            "--save-every", "1", *extra]


def sft_args(*args):
    return cold_start.parse_args(sft_flags(*args))


@pytest.fixture(scope="module")
def sft_run(tiny_model, teachers, tmp_path_factory):
    """One uninterrupted two-step SFT run: (data root, out dir)."""
    root = write_data_root(str(tmp_path_factory.mktemp("sft") / "data"))
    out = os.path.join(os.path.dirname(root), "out")
    cold_start.main(sft_args(tiny_model, teachers, root, out))
    return root, out


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sft_trains_a_student_lora_on_routed_teacher_samples(tiny_model, sft_run):
    root, out = sft_run
    shard = torch.load(cold_start.shard_path(os.path.join(out, "samples"), 0))
    assert shard["tasks"] == ["objects"] * 3 + ["signs"] * 2 and shard["texts"][0] == "a red cat"
    assert shard["latents"].shape == (5, 4, 8, 8) and shard["rewards"] is None
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) and r["lr"] == 1e-2 for r in rows)
    assert os.path.isfile(os.path.join(out, "samples.png"))
    pipe = common.load_pipeline(tiny_model)
    cond, _ = common.encode_prompts(pipe, ["a red cat"], max_sequence_length=1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = common.velocity(pipe.transformer, x, 0.5, *cond)
        pipe.load_lora_weights(os.path.join(out, "final"))
        student = common.velocity(pipe.transformer, x, 0.5, *cond)
    assert not torch.allclose(base, student, atol=1e-4)


def test_teacher_samples_are_the_routed_teachers_ode_samples(tiny_model, teachers, sft_run):
    _, out = sft_run
    shard = torch.load(cold_start.shard_path(os.path.join(out, "samples"), 0))
    pipe = common.load_pipeline(tiny_model)
    common.load_lora(pipe.transformer, teachers["diffusers"][0], "signs")
    _, latents = common.generate(pipe, shard["texts"][3:], common.sample_generators(0, 0, [3, 4]), steps=2,
                                 resolution=8, max_sequence_length=1, return_latents=True)
    assert torch.allclose(shard["latents"][3:], latents, atol=1e-5)


def test_sft_resume_reuses_the_sample_cache_and_matches_an_uninterrupted_run(tiny_model, teachers, sft_run,
                                                                              tmp_path, monkeypatch):
    root, full_out = sft_run
    out = str(tmp_path / "out")
    cold_start.main(sft_args(tiny_model, teachers, root, out, "--max-steps", "1"))
    shard_file = cold_start.shard_path(os.path.join(out, "samples"), 0)
    cached = os.path.getmtime(shard_file)

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached teacher samples were generated again")
    monkeypatch.setattr(common, "generate", no_sampling)
    cold_start.main(sft_args(tiny_model, teachers, root, out, "--resume", "auto"))
    assert os.path.getmtime(shard_file) == cached
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert read_metrics(out)[1]["loss"] == pytest.approx(read_metrics(full_out)[1]["loss"], rel=1e-5)
    resumed, _ = common.read_lora(os.path.join(out, "final"))
    uninterrupted, _ = common.read_lora(os.path.join(full_out, "final"))
    for key in uninterrupted:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6), key
    with pytest.raises(ValueError, match="other \\['steps'\\]"):  # other sampling settings: never reuse the cache
        cold_start.main(sft_args(tiny_model, teachers, root, out, "--resume", "auto", "--steps", "3"))


def test_best_of_keeps_the_highest_reward_candidate(tiny_model, teachers, tmp_path, monkeypatch):
    import rewards

    def brightness(images, prompts, metadata):
        return images.reshape(len(images), -1).mean(1)
    monkeypatch.setitem(rewards.REWARDS, "brightness", lambda: brightness)
    root, out = write_data_root(str(tmp_path / "data")), str(tmp_path / "out")
    cold_start.main(sft_args(tiny_model, teachers, root, out, "--best-of", "3", "--samples-per-prompt", "2",
                             "--max-prompts", "1", "--max-steps", "1",
                             "--reward", "objects=brightness;signs=brightness"))
    shard = torch.load(cold_start.shard_path(os.path.join(out, "samples"), 0))
    assert len(shard["texts"]) == 4 and shard["rewards"].shape == (4, 3)
    pipe = common.load_pipeline(tiny_model)
    common.load_lora(pipe.transformer, teachers["peft"][0], "objects")
    common.load_lora(pipe.transformer, teachers["diffusers"][0], "signs")
    for row, (task, text) in enumerate(zip(shard["tasks"], shard["texts"])):
        common.use_adapter(pipe.transformer, task)
        images, latents = common.generate(pipe, [text] * 3, common.sample_generators(0, 0, range(3 * row, 3 * row + 3)),
                                          steps=2, resolution=8, max_sequence_length=1, return_latents=True)
        scores = (images * 255).round().reshape(3, -1).mean(1)
        assert torch.allclose(shard["rewards"][row].double(), scores.double(), atol=1e-4)
        assert torch.allclose(shard["latents"][row], latents[scores.argmax()], atol=1e-5)


@pytest.mark.parametrize("case,error,match", [
    ("other_modules", ValueError, "target different modules"),
    ("merge_rank", ValueError, "--merge-rank 99 must be between 1 and the stacked rank 5"),
    ("missing_adapter", FileNotFoundError, "does not exist"),
    ("other_base_model", ValueError, "different base models"),
])
def test_bad_merge_input_names_the_problem_and_writes_nothing(teachers, tmp_path, case, error, match):
    good = f"geneval={teachers['peft'][0]},ocr={teachers['diffusers'][0]}"
    argv = {"other_modules": ["--teachers", f"geneval={teachers['peft'][0]},ocr={teachers['qk_only'][0]}"],
            "merge_rank": ["--teachers", good, "--merge-rank", "99"],
            "missing_adapter": ["--teachers", f"geneval={tmp_path / 'nope'},ocr={teachers['diffusers'][0]}"]}.get(case)
    if case == "other_base_model":
        state, config = common.read_lora(teachers["peft"][0])
        state = {k: torch.cat([v, v], 1) if k.endswith("lora_A.weight") else v for k, v in state.items()}
        common.write_lora(state, config, str(tmp_path / "wide"))
        argv = ["--teachers", f"geneval={teachers['peft'][0]},ocr={tmp_path / 'wide'}"]
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        cold_start.main(cold_start.parse_args(["--init", "merge", "--out", str(out), *argv]))
    assert not out.exists()


@pytest.mark.parametrize("case,error,match", [
    ("task_without_teacher", ValueError, "no teacher for task\\(s\\) \\['signs'\\]"),
    ("missing_adapter", FileNotFoundError, "does not exist"),
    ("best_of_without_reward", ValueError, "gives no reward for task\\(s\\) \\['signs'\\]"),
    ("only_base_teachers", ValueError, "needs a LoRA teacher"),
    ("caption_dropout_above_one", ValueError, "--caption-dropout 1.5 is a share"),
])
def test_bad_sft_input_names_the_problem_and_writes_nothing(tiny_model, teachers, tmp_path, case, error, match):
    root, out = write_data_root(str(tmp_path / "data")), tmp_path / "out"
    argv = {"task_without_teacher": ["--teachers", f"objects={teachers['peft'][0]}", "--tasks", "objects,signs"],
            "missing_adapter": ["--teachers", f"objects={tmp_path / 'nope'},signs={teachers['peft'][0]}"],
            "best_of_without_reward": ["--best-of", "2", "--reward", "objects=jpeg"],
            "only_base_teachers": ["--teachers", "objects=base,signs=base"],
            "caption_dropout_above_one": ["--caption-dropout", "1.5"]}[case]
    with pytest.raises(error, match=match):
        cold_start.main(sft_args(tiny_model, teachers, root, str(out), *argv))  # the later flag wins
    assert not out.exists()


def record_student_inputs(monkeypatch):
    """A list that collects (x, t, prompt_embeds, pooled) of every student forward in SFT training."""
    seen = []
    velocity = common.velocity

    def spy(transformer, *inputs):
        if torch.is_grad_enabled():  # training; teacher sampling runs under no_grad
            seen.append(tuple(i.detach().clone() for i in inputs))
        return velocity(transformer, *inputs)
    monkeypatch.setattr(common, "velocity", spy)
    return seen


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_caption_dropout_trains_the_unconditional_branch(tiny_model, teachers, sft_run, tmp_path, monkeypatch, dropout):
    """--caption-dropout p: that share of samples is trained with the empty prompt's embeddings, CFG's
    unconditional branch (p = 1: every sample; p = 0: none)."""
    root, _ = sft_run
    seen = record_student_inputs(monkeypatch)
    out = str(tmp_path / "out")
    cold_start.main(sft_args(tiny_model, teachers, root, out, "--max-steps", "1", "--caption-dropout", str(dropout)))
    pipe = common.load_pipeline(tiny_model)
    shard = torch.load(cold_start.shard_path(os.path.join(out, "samples"), 0))
    (_, _, embeds, pooled), = seen
    step_texts = [shard["texts"][i] for i in cold_start.batch_indices(1, 2, len(shard["texts"]), 0)]
    cond, uncond = common.encode_prompts(pipe, step_texts, max_sequence_length=1)
    expected = uncond if dropout == 1.0 else cond
    assert torch.allclose(embeds, expected[0], atol=1e-6) and torch.allclose(pooled, expected[1], atol=1e-6)
    assert not torch.allclose(cond[1], uncond[1], atol=1e-3)  # the two branches do differ here


@pytest.mark.parametrize("flags,shift", [((), 3.0), (("--train-shift", "1"), 1.0)])
def test_train_shift_sets_the_training_times(tiny_model, teachers, sft_run, tmp_path, monkeypatch, flags, shift):
    """t = shift u / (1 + (shift - 1) u), u = sigmoid(N(0, 1)) drawn after each sample's noise (FM); default --shift."""
    root, _ = sft_run
    seen = record_student_inputs(monkeypatch)
    cold_start.main(sft_args(tiny_model, teachers, root, str(tmp_path / "out"), "--max-steps", "1", *flags))
    expected = []
    for g in common.sample_generators(0, 1, range(2)):
        torch.randn(4, 8, 8, generator=g)  # the sample's noise comes first
        u = torch.sigmoid(torch.randn(1, generator=g))
        expected.append(shift * u / (1 + (shift - 1) * u))
    assert torch.allclose(seen[0][1], torch.cat(expected), atol=1e-6)


def test_sft_torchrun_two_processes_match_one(tiny_model, teachers, sft_run, tmp_path):
    """SFT syncs its gradients like GRPO and OPD (each rank's loss / world size, summed by hand), so
    two processes train the same student as one."""
    root, one = sft_run
    flags = sft_flags(tiny_model, teachers, root, str(tmp_path / "two"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29521", os.path.join(ROOT, "cold_start.py"), *flags],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for a, b in zip(read_metrics(one), read_metrics(str(tmp_path / "two")), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    la, _ = common.read_lora(os.path.join(one, "final"))
    lb, _ = common.read_lora(str(tmp_path / "two" / "final"))
    assert all(torch.allclose(la[k], lb[k], atol=1e-5) for k in la)
    assert max((la[k] - common.read_lora(os.path.join(one, "checkpoint-1"))[0][k]).abs().max() for k in la) > 0
