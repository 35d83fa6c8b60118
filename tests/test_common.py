"""common.py's math against independent references: diffusers' scheduler and pipeline,
torch.distributions, Monte Carlo and closed forms."""
import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal, kl_divergence

import common
from conftest import FLOW_GRPO_DATA


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (10, 3.0), (40, 3.0), (10, 1.0)])
def test_timesteps_equal_diffusers_sigmas(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    assert torch.allclose(common.timesteps(steps, shift), scheduler.sigmas, atol=1e-6)


def _state(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 5, 5, generator=g), torch.randn(b, 4, 5, 5, generator=g)


@pytest.mark.parametrize("i", [0, 4, 9])  # i = 0 is t = 1, where sigma_t uses t_next
def test_sde_log_prob_is_normal_density(i):
    v, x = _state()
    t = common.timesteps(10)
    step = common.sde_step(v, x, t[i], t[i + 1], 0.7, generator=torch.Generator().manual_seed(1))
    # mean and std written out from (SDE) independently of the implementation
    tc, tn, a = t[i].item(), t[i + 1].item(), 0.7
    sigma = a * math.sqrt(tc / (1 - (tn if tc >= 1 else tc)))
    dt = tn - tc
    mean = x * (1 + sigma**2 * dt / (2 * tc)) + v * (1 + sigma**2 * (1 - tc) / (2 * tc)) * dt
    std = sigma * math.sqrt(-dt)
    assert torch.allclose(step.mean, mean, atol=1e-5) and math.isclose(step.std.flatten()[0].item(), std, rel_tol=1e-5)
    reference = Normal(mean, std).log_prob(step.x_next).mean(dim=(1, 2, 3))
    assert torch.allclose(step.log_prob, reference, atol=1e-4)


def test_scoring_a_sample_gives_its_sampling_log_prob():
    v, x = _state()
    t = common.timesteps(10)
    sampled = common.sde_step(v, x, t[3], t[4], 0.7, generator=torch.Generator().manual_seed(5))
    scored = common.sde_step(v, x, t[3], t[4], 0.7, x_next=sampled.x_next)
    assert torch.equal(scored.x_next, sampled.x_next)
    assert torch.allclose(scored.log_prob, sampled.log_prob, atol=1e-6)
    again = common.sde_step(v, x, t[3], t[4], 0.7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.x_next, sampled.x_next)


def test_per_sample_times_equal_scalar_times():
    v, x = _state()
    t = common.timesteps(10)
    ts, tn = torch.stack([t[1], t[5], t[8]]), torch.stack([t[2], t[6], t[9]])
    x_next = torch.randn_like(x)
    batched = common.sde_step(v, x, ts, tn, 0.7, x_next=x_next)
    for j, k in enumerate([1, 5, 8]):
        single = common.sde_step(v[j:j + 1], x[j:j + 1], t[k], t[k + 1], 0.7, x_next=x_next[j:j + 1])
        assert torch.allclose(batched.log_prob[j], single.log_prob[0], atol=1e-6)


def test_ode_step_is_diffusers_scheduler_step():
    v, x = _state()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    t = common.timesteps(10)
    for i, ts in enumerate(scheduler.timesteps):
        expected = scheduler.step(v, ts, x, return_dict=False)[0]
        ours = common.sde_step(v, x, t[i], t[i + 1], 0.0)
        assert torch.allclose(ours.x_next, expected, atol=1e-6)


def test_step_kl_equals_kl_of_the_two_gaussians():
    v_s, x = _state()
    v_t = v_s + 0.3 * torch.randn_like(v_s)
    t = common.timesteps(10)
    for i in (0, 5, 9):
        s = common.sde_step(v_s, x, t[i], t[i + 1], 0.7)
        tt = common.sde_step(v_t, x, t[i], t[i + 1], 0.7)
        std = s.std.flatten()[0]
        reference = kl_divergence(Normal(s.mean, std), Normal(tt.mean, std)).mean(dim=(1, 2, 3))
        assert torch.allclose(common.step_kl(v_s, v_t, t[i], t[i + 1], 0.7), reference, rtol=1e-4)


def test_step_kl_matches_monte_carlo_log_ratio():
    g = torch.Generator().manual_seed(0)
    v_s, x = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    v_t = v_s + 0.5 * torch.randn(1, 2, 4, 4, generator=g)
    t = common.timesteps(10)
    n = 4000
    v_s, v_t, x = v_s.expand(n, -1, -1, -1), v_t.expand(n, -1, -1, -1), x.expand(n, -1, -1, -1)
    s = common.sde_step(v_s, x, t[4], t[5], 0.7, generator=g)
    teacher = common.sde_step(v_t, x, t[4], t[5], 0.7, x_next=s.x_next)
    log_ratio = s.log_prob - teacher.log_prob
    kl = common.step_kl(v_s[:1], v_t[:1], t[4], t[5], 0.7).item()
    se = log_ratio.std().item() / math.sqrt(n)
    assert abs(log_ratio.mean().item() - kl) < 4 * se
    assert kl > 10 * se  # the check has power: the KL is far from zero


def test_kl_penalty_is_dt_times_step_kl():
    v_s, _ = _state()
    v_t = v_s + 0.2
    t = common.timesteps(10)
    expected = (t[3] - t[4]).abs() * common.step_kl(v_s, v_t, t[3], t[4], 0.7)
    assert torch.allclose(common.kl_penalty(v_s, v_t, t[3], t[4], 0.7), expected)


def test_rollout_ode_matches_stable_diffusion3_pipeline(tiny_pipe):
    cond, uncond = common.encode_prompts(tiny_pipe, ["a red cat", "a dog"], max_sequence_length=1)
    latents = common.initial_latents(tiny_pipe, 8, common.sample_generators(0, 0, [0, 1]), "cpu")
    expected = tiny_pipe(prompt_embeds=cond[0], pooled_prompt_embeds=cond[1], negative_prompt_embeds=uncond[0],
                         negative_pooled_prompt_embeds=uncond[1], latents=latents.clone(), num_inference_steps=6,
                         guidance_scale=4.5, output_type="latent").images
    ours = common.rollout(tiny_pipe.transformer, cond, uncond, latents, common.timesteps(6), 4.5, 0.0)
    assert ours.xs.shape == (2, 7, 4, 8, 8) and torch.equal(ours.xs[:, 0], latents)
    assert torch.allclose(ours.xs[:, -1], expected, atol=1e-5)


def test_rollout_log_probs_score_their_own_transitions(tiny_pipe):
    cond, uncond = common.encode_prompts(tiny_pipe, ["a red cat"], max_sequence_length=1)
    latents = common.initial_latents(tiny_pipe, 8, common.sample_generators(0, 0, [0]), "cpu")
    t = common.timesteps(4)
    out = common.rollout(tiny_pipe.transformer, cond, uncond, latents, t, 4.5, 0.7,
                         generator=common.sample_generators(0, 0, [0]))
    with torch.no_grad():
        for i in range(4):
            v = common.guided_velocity(tiny_pipe.transformer, out.xs[:, i], t[i], cond, uncond, 4.5)
            scored = common.sde_step(v, out.xs[:, i], t[i], t[i + 1], 0.7, x_next=out.xs[:, i + 1])
            assert torch.allclose(scored.log_prob, out.log_probs[:, i], atol=1e-4)


def test_rollout_sde_window_is_sde_then_euler_ode(tiny_pipe):
    """sde_steps=2 of 4: two noisy SDE steps (scored by their log-probs), then plain Euler steps with log-prob 0."""
    cond, uncond = common.encode_prompts(tiny_pipe, ["a red cat"], max_sequence_length=1)
    latents = common.initial_latents(tiny_pipe, 8, common.sample_generators(0, 0, [0]), "cpu")
    t = common.timesteps(4)
    out = common.rollout(tiny_pipe.transformer, cond, uncond, latents, t, 4.5, 0.7,
                         generator=common.sample_generators(0, 0, [0]), sde_steps=2)
    with torch.no_grad():
        for i in range(4):
            v = common.guided_velocity(tiny_pipe.transformer, out.xs[:, i], t[i], cond, uncond, 4.5)
            euler = out.xs[:, i] + (t[i + 1] - t[i]) * v
            if i < 2:
                assert not torch.allclose(out.xs[:, i + 1], euler, atol=1e-3) and out.log_probs[0, i] != 0
            else:
                assert torch.allclose(out.xs[:, i + 1], euler, atol=1e-5) and out.log_probs[0, i] == 0


@pytest.mark.parametrize("window,noisy", [("all", [True, True, True, True]), ("trained", [True, True, False, False])])
def test_sde_window_flag_limits_noise_to_the_trained_steps(tiny_pipe, window, noisy):
    import teacher_grpo
    args = teacher_grpo.parse_args(["--steps", "4", "--timestep-fraction", "0.5", "--sde-window", window,
                                    "--batch-size", "1", "--group-size", "2", "--max-sequence-length", "1",
                                    "--resolution", "8"])
    prompts = [common.Prompt("a red cat", "objects", {})]
    *_, log_probs = common.on_policy_rollouts(tiny_pipe, prompts, args, 1, slice(0, 2), 4.5, torch.device("cpu"),
                                              common.timesteps(4))
    assert (log_probs != 0).all(0).tolist() == noisy


def test_sample_noise_does_not_depend_on_the_batch(tiny_pipe):
    cond, uncond = common.encode_prompts(tiny_pipe, ["a red cat", "a dog"], max_sequence_length=1)
    t = common.timesteps(3)
    gens = lambda idx: common.sample_generators(7, 2, idx)
    both = common.rollout(tiny_pipe.transformer, cond, uncond, common.initial_latents(tiny_pipe, 8, gens([0, 1]), "cpu"),
                          t, 4.5, 0.7, generator=gens([0, 1]))
    second = common.rollout(tiny_pipe.transformer, (cond[0][1:], cond[1][1:]), (uncond[0][1:], uncond[1][1:]),
                            common.initial_latents(tiny_pipe, 8, gens([1]), "cpu"), t, 4.5, 0.7, generator=gens([1]))
    assert torch.allclose(both.xs[1], second.xs[0], atol=1e-5)


def test_sde_and_ode_share_marginals_on_a_gaussian():
    """Data N(m, s^2): the exact velocity E[eps - x0 | x_t] is linear in x_t; both samplers must land on N(m, s^2)."""
    m, s2 = 1.5, 0.25

    def exact_velocity(x, t):
        var = (1 - t) ** 2 * s2 + t**2
        return -m + (t - (1 - t) * s2) / var * (x - (1 - t) * m)

    t = common.timesteps(100, shift=1.0)
    g = torch.Generator().manual_seed(0)
    finals = {}
    for a in (0.0, 0.7):
        x = torch.randn(40000, 1, generator=g)
        for i in range(100):
            x = common.sde_step(exact_velocity(x, t[i].item()), x, t[i], t[i + 1], a, generator=g).x_next
        finals[a] = x
    for a, x in finals.items():
        assert abs(x.mean().item() - m) < 0.03, a
        assert abs(x.var().item() - s2) < 0.03, a
    assert abs(finals[0.0].var().item() - finals[0.7].var().item()) < 0.03


def test_group_advantages_match_numpy():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv, keep = common.group_advantages(rewards, 4)
    r = rewards.numpy().reshape(2, 4)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)
    assert np.allclose(adv.numpy(), expected.flatten(), atol=1e-6)
    assert keep.tolist() == [True] * 4 + [False] * 4


def test_ppo_clip_loss_is_the_clipped_surrogate():
    lp, old = torch.tensor([0.0, 0.01, -0.01, 0.0]), torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, clipped, _ = common.ppo_clip_loss(lp, old, adv, clip_range=1e-3)
    # by hand: ratio 1.01 > 1 + eps with A > 0 is capped; ratio 0.99 with A < 0 is capped at 1 - eps
    expected = torch.tensor([-1.0, -1.001, 0.999, 2.0])
    assert torch.allclose(loss, expected) and clipped.tolist() == [False, True, True, False]


def test_route_splits_a_mixed_batch_per_teacher():
    groups = common.route(["ocr", "geneval", "ocr", "pickscore"], ["geneval", "ocr", "pickscore"])
    assert {k: v.tolist() for k, v in groups.items()} == {"ocr": [0, 2], "geneval": [1], "pickscore": [3]}
    with pytest.raises(ValueError, match="no teacher for task.*'ocr'"):
        common.route(["ocr"], ["geneval"])


def _random_lora(modules, r, g, inp=6, out=5):
    return {**{f"{m}.lora_A.weight": torch.randn(r, inp, generator=g) for m in modules},
            **{f"{m}.lora_B.weight": torch.randn(out, r, generator=g) for m in modules}}


def test_merge_is_the_weighted_sum_of_updates():
    g = torch.Generator().manual_seed(0)
    mods = ["blocks.0.attn.to_q", "blocks.0.attn.to_k"]
    loras = [_random_lora(mods, r, g) for r in (2, 3, 4)]
    w = [0.5, 0.3, 0.2]
    merged = common.merge_loras(loras, w)
    for m in mods:
        expected = sum(wk * l[f"{m}.lora_B.weight"] @ l[f"{m}.lora_A.weight"] for wk, l in zip(w, loras))
        assert merged[f"{m}.lora_A.weight"].shape == (9, 6)
        assert torch.allclose(merged[f"{m}.lora_B.weight"] @ merged[f"{m}.lora_A.weight"], expected, atol=1e-5)


def test_merge_rank_truncation_is_the_optimal_rank_r_error():
    g = torch.Generator().manual_seed(1)
    loras = [_random_lora(["m"], 3, g, inp=8, out=7) for _ in range(2)]
    full = sum(l["m.lora_B.weight"] @ l["m.lora_A.weight"] for l in loras) / 2
    merged = common.merge_loras(loras, rank=2)
    error = torch.linalg.norm(merged["m.lora_B.weight"] @ merged["m.lora_A.weight"] - full)
    s = torch.linalg.svdvals(full.double())
    assert math.isclose(error.item(), s[2:].square().sum().sqrt().item(), rel_tol=1e-4)  # Eckart-Young
    with pytest.raises(ValueError, match="larger than the stacked rank 6"):
        common.merge_loras(loras, rank=7)


def test_merge_rejects_adapters_on_other_modules():
    g = torch.Generator().manual_seed(2)
    with pytest.raises(ValueError, match="other modules"):
        common.merge_loras([_random_lora(["a"], 2, g), _random_lora(["b"], 2, g)])


def test_use_adapter_keeps_the_student_trainable(tiny_model):
    tr = common.load_pipeline(tiny_model).transformer
    tr.add_adapter(common.lora_config(4, 8), "student")
    tr.add_adapter(common.lora_config(4, 8), "teacher")
    common.use_adapter(tr, "student")  # only the student's LoRA is trainable, whatever peft did on add
    for n, p in tr.named_parameters():
        p.requires_grad_(".student." in n)
    student = {n for n, p in tr.named_parameters() if p.requires_grad}
    assert student and all(".student." in n for n in student)
    for name in ("teacher", "base", "student", "teacher"):
        common.use_adapter(tr, name)
        assert {n for n, p in tr.named_parameters() if p.requires_grad} == student


def test_use_adapter_switches_the_forward(tiny_pipe, tiny_model):
    tr = common.load_pipeline(tiny_model).transformer
    cond, _ = common.encode_prompts(tiny_pipe, ["a cat"], max_sequence_length=1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = common.velocity(tr, x, 0.5, *cond)
        for name in ("a", "b"):
            tr.add_adapter(common.lora_config(4, 8), name)
            for n, p in tr.named_parameters():
                if f".{name}." in n and "lora_B" in n:
                    p.normal_(0, 0.5)
        outs = {}
        for name in ("a", "b", "base"):
            common.use_adapter(tr, name)
            outs[name] = common.velocity(tr, x, 0.5, *cond)
    assert torch.allclose(outs["base"], base)
    assert not torch.allclose(outs["a"], base, atol=1e-3) and not torch.allclose(outs["a"], outs["b"], atol=1e-3)


def _perturbed_lora(tr, name, rank=4, alpha=8):
    tr.add_adapter(common.lora_config(rank, alpha), name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if f".{name}." in n and "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_saved_lora_loads_in_the_pipeline_at_its_scale(tiny_model, tmp_path):
    pipe = common.load_pipeline(tiny_model)
    cond, _ = common.encode_prompts(pipe, ["a cat"], max_sequence_length=1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    _perturbed_lora(pipe.transformer, "student")
    with torch.no_grad():
        ours = common.velocity(pipe.transformer, x, 0.5, *cond)
    common.save_lora(pipe.transformer, "student", str(tmp_path))
    fresh = common.load_pipeline(tiny_model)
    with torch.no_grad():
        base = common.velocity(fresh.transformer, x, 0.5, *cond)
        fresh.load_lora_weights(str(tmp_path))
        loaded = common.velocity(fresh.transformer, x, 0.5, *cond)
    assert not torch.allclose(base, ours, atol=1e-3)
    assert torch.allclose(loaded, ours, atol=1e-5)


def test_read_lora_accepts_peft_folders_and_folds_the_scale(tiny_model, tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    tr = common.load_pipeline(tiny_model).transformer
    _perturbed_lora(tr, "t", rank=4, alpha=16)
    state = get_peft_model_state_dict(tr, adapter_name="t")
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16, "target_modules": common.LORA_TARGETS}))
    read, config = common.read_lora(str(tmp_path))
    assert set(read) == set(state) and config["lora_alpha"] == 16
    folded = common.fold_scale(read, config)
    key = next(k for k in read if "lora_B" in k)
    assert torch.allclose(folded[key], 4.0 * state[key])
    other = common.load_pipeline(tiny_model).transformer
    common.load_lora(other, str(tmp_path), "t")
    x = torch.randn(1, 4, 8, 8)
    cond = (torch.randn(1, 78, 32), torch.randn(1, 32))
    with torch.no_grad():
        assert torch.allclose(common.velocity(other, x, 0.3, *cond), common.velocity(tr, x, 0.3, *cond), atol=1e-5)


def test_load_lora_rejects_an_adapter_for_another_model(tiny_model, tmp_path):
    tr = common.load_pipeline(tiny_model).transformer
    state = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 99),
             "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 4)}
    with pytest.raises(ValueError, match="another base model"):
        common.add_lora_from_state(tr, "x", state, {"r": 4, "lora_alpha": 4})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common.read_lora(str(tmp_path / "nope"))


def test_load_prompts_reads_flow_grpo_layout():
    prompts = common.load_prompts(FLOW_GRPO_DATA, ["geneval", "ocr", "pickscore"], split="test")
    by_task = {t: [p for p in prompts if p.task == t] for t in ("geneval", "ocr", "pickscore")}
    assert [len(v) for v in by_task.values()] == [7, 20, 20]
    first = by_task["geneval"][0]
    assert first.text == "a photo of two wine glasses" and first.metadata["tag"] == "counting"
    assert first.metadata["include"] == [{"class": "wine glass", "count": 2}]
    assert by_task["ocr"][0].text.count('"') >= 2 and by_task["ocr"][0].metadata == {}
    assert {p.metadata["tag"] for p in by_task["geneval"]} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}


def test_bad_prompt_input_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common.load_prompts(str(tmp_path / "missing"), ["ocr"])
    (tmp_path / "ocr").mkdir()
    with pytest.raises(ValueError, match="unknown task 'gen'.*\\['ocr'\\]"):
        common.load_prompts(str(tmp_path), ["gen"])
    with pytest.raises(FileNotFoundError, match="no train prompts"):
        common.load_prompts(str(tmp_path), ["ocr"])
    (tmp_path / "ocr" / "train.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        common.load_prompts(str(tmp_path), ["ocr"])


def test_load_pipeline_rejects_non_sd3_folders(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        common.load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="expected a StableDiffusion3Pipeline"):
        common.load_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="no such diffusers folder"):
        common.load_pipeline(str(tmp_path / "nope"))


def test_checkpoint_is_atomic_and_resume_auto_finds_it(tiny_model, tmp_path):
    tr = common.load_pipeline(tiny_model).transformer
    tr.add_adapter(common.lora_config(4, 8), "s")
    common.save_checkpoint(str(tmp_path), 2, tr, "s", {"x": 1})
    os.makedirs(tmp_path / ".tmp-checkpoint-3")  # a write killed half way
    os.makedirs(tmp_path / "checkpoint-4")  # no state.pt: incomplete
    path = common.find_checkpoint("auto", str(tmp_path))
    assert path.endswith("checkpoint-2") and common.load_checkpoint_state(path)["x"] == 1
    (tmp_path / "latest").unlink()
    assert common.find_checkpoint("auto", str(tmp_path)).endswith("checkpoint-2")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        common.find_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path))


def test_metrics_logger_drops_rows_past_the_resumed_step(tmp_path):
    log = common.MetricsLogger(str(tmp_path))
    for step in range(5):
        log.log({"step": step, "loss": step})
    common.MetricsLogger(str(tmp_path), resume_step=2).log({"step": 3, "loss": 30})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 0), (1, 1), (2, 2), (3, 30)]


def test_each_group_of_consecutive_samples_shares_one_prompt():
    """(GRPO) normalises rewards over G consecutive samples: they must all be rollouts of one prompt,
    and the groups are the step's prompts in order."""
    ids = common.group_prompt_ids(num_prompts=50, batch_size=6, group_size=4, seed=0, step=3)
    groups = ids.reshape(6, 4)
    assert (groups == groups[:, :1]).all()
    assert groups[:, 0].tolist() == common.step_prompts(50, 6, 0, 3).tolist()
