"""The math and plumbing every Flow-OPD stage shares, in reading order.

Sections 1-8 are the method, each equation computed once on the line that carries its tag
((SDE), (LOGP), (KL), ...; docs/design.md and the README's equation table list them):
    1 schedule and SDE sampler   2 per-step KL   3 model calls and guidance   4 rollouts
    5 flow matching   6 GRPO / OPD / MAR objectives   7 routing   8 LoRA merge
Sections 9-14 are the plumbing around it: LoRA adapters, pipeline and prompts, distributed,
optimizer and metrics, checkpoints and faults, the command line.
Pure functions and small classes; nothing runs at import, and no project module is imported.

Conventions (diffusers' SD3): t in [0, 1] is the noise level ("sigma"), x_t = (1 - t) x_0 + t eps,
v = eps - x_0, sampling runs t = 1 -> 0, dt = t_next - t < 0.
"""
import contextlib
import datetime
import io
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import zlib
from collections import namedtuple

import numpy as np
import torch
import torch.distributed as dist

# the released Flow-GRPO teachers, one LoRA per task on SD3.5-M
PAPER_TEACHERS = ("geneval=jieliu/SD3.5M-FlowGRPO-GenEval,ocr=jieliu/SD3.5M-FlowGRPO-Text,"
                  "pickscore=jieliu/SD3.5M-FlowGRPO-PickScore")
# Flow-GRPO's LoRA targets: the `attn.` prefix leaves SD3.5-M's dual-attention `attn2` out
LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
SDEStep = namedtuple("SDEStep", "x_next log_prob mean std")
Rollout = namedtuple("Rollout", "xs log_probs")
# a step's on-policy samples on this rank: prompts, their (cond, uncond) embeddings, the states
# xs [B, T + 1, ...] and log-probs [B, T] of the rollouts
Rollouts = namedtuple("Rollouts", "prompts cond uncond xs log_probs")
# what an optimizer step updates: the LoRA's fp32 parameters on `transformer`, AdamW, EMA or None
TrainedLoRA = namedtuple("TrainedLoRA", "transformer params optimizer ema")
Prompt = namedtuple("Prompt", "text task metadata")
Dist = namedtuple("Dist", "rank world_size local_rank device is_main")
EvalItem = namedtuple("EvalItem", "task i j prompt")
MAX_IMAGES_PER_PROMPT = 10_000  # evaluation noise id of (prompt i, image j) = i * MAX + j
RANK_ERROR_DELAY = 5.0  # seconds a rank other than 0 waits before it reports bad input (cli)
HACKING_WINDOW = 3  # the hacking check compares an evaluation with the one 2 evaluations back


# ------------------------------------------------------- 1. schedule and SDE sampler (SDE) (LOGP)


def timesteps(num_steps, shift=3.0, num_train_timesteps=1000):
    """The sampling schedule t_0 = 1 > ... > t_N = 0, equal to FlowMatchEulerDiscreteScheduler(shift).sigmas."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    # diffusers spaces the unshifted times from 1 down to the shifted smallest training time, then shifts
    s_min = torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32)
    s_min = (shift * s_min / (1 + (shift - 1) * s_min)).item()
    s = torch.linspace(1.0, s_min, num_steps, dtype=torch.float64)
    t = (shift * s / (1 + (shift - 1) * s)).float()
    return torch.cat([t, torch.zeros(1)])


def _per_sample(t, x):
    """A float or Tensor[B] as a float32 tensor that broadcasts against x [B, ...]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


def sde_sigma(t, t_next, noise_level):
    """sigma_t = a sqrt(t / (1 - t)); at t = 1 the denominator uses t_next (Flow-GRPO).   # (SDE)"""
    return noise_level * torch.sqrt(t / (1 - torch.where(t >= 1, t_next, t)))  # (SDE)


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, std^2 I), averaged over all non-batch elements.   # (LOGP)"""
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)  # (LOGP)
    return lp.mean(dim=tuple(range(1, x.dim())))


def sde_step(v, x, t, t_next, noise_level, x_next=None, generator=None):
    """One step of the SDE sampler with the ODE's marginals (SDE), and the step's log-prob (LOGP).

    v, x: [B, ...]; t, t_next: float or Tensor[B]. With x_next given it is scored, not sampled.
    noise_level 0 is the Euler ODE step (= FlowMatchEulerDiscreteScheduler.step); it has no
    density, so log_prob is 0 there.
    """
    x, v = x.float(), v.float()
    t, t_next = _per_sample(t, x), _per_sample(t_next, x)
    dt = t_next - t
    sigma = sde_sigma(t, t_next, noise_level)
    mean = x * (1 + sigma**2 * dt / (2 * t)) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt  # (SDE)
    std = sigma * torch.sqrt(-dt)  # (SDE)
    if noise_level == 0:
        x_next = mean if x_next is None else x_next
        return SDEStep(x_next, torch.zeros(x.shape[0], device=x.device), mean, std)
    if x_next is None:
        from diffusers.utils.torch_utils import randn_tensor
        x_next = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)  # (SDE)
    return SDEStep(x_next, gaussian_log_prob(x_next.float(), mean, std), mean, std)


# ---------------------------------------------------------------------------- 2. per-step KL (KL)


def kl_weight(t, t_next, noise_level):
    """lambda_t of (KL): KL_t = lambda_t ||v_s - v_T||^2 when both policies share the step's std."""
    dt = t_next - t
    sigma = sde_sigma(t, t_next, noise_level)
    return dt.abs() * (1 + sigma**2 * (1 - t) / (2 * t)) ** 2 / (2 * sigma**2)  # (KL)


def step_kl(v_student, v_teacher, t, t_next, noise_level):
    """Reverse KL between the student's and teacher's Gaussian SDE steps from the same x_t, Tensor[B].

    Reduced like (LOGP) (mean over elements), so E_{x_next ~ pi_s}[log pi_s - log pi_T] = KL_t.
    """
    if noise_level <= 0:
        raise ValueError("step_kl needs noise_level > 0: the ODE step is deterministic and has no KL")
    diff = (v_student.float() - v_teacher.float()) ** 2
    lam = kl_weight(_per_sample(t, diff), _per_sample(t_next, diff), noise_level)
    return (lam * diff).mean(dim=tuple(range(1, diff.dim())))  # (KL)


def kl_penalty(v_student, v_ref, t, t_next, noise_level):
    """KL_t on the scale the paper's betas were tuned on, Tensor[B].

    Flow-GRPO and the released Flow-OPD code divide by 2 sigma_t^2 instead of 2 std^2, i.e. their
    KL term is |dt| KL_t; GRPO's beta 0.04 and MAR's 0.1 assume that scale.
    """
    diff = v_student.float()
    dt = (_per_sample(t_next, diff) - _per_sample(t, diff)).abs().flatten()
    return dt.expand(diff.shape[0]) * step_kl(v_student, v_ref, t, t_next, noise_level)  # (KL)


# -------------------------------------------------------------- 3. model calls and guidance (CFG)


def velocity(transformer, x, t, prompt_embeds, pooled):
    """The transformer's velocity at (x, t); t float or Tensor[B] in [0, 1] (the model sees 1000 t)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
    out = transformer(hidden_states=x.to(transformer.dtype), timestep=t * 1000, encoder_hidden_states=prompt_embeds,
                      pooled_projections=pooled, return_dict=False)[0]
    return out.float()


def guided_velocity(transformer, x, t, cond, uncond, guidance_scale):
    """Classifier-free guided velocity; one batched forward for both branches, as the SD3 pipeline does."""
    if guidance_scale <= 1 or uncond is None:
        return velocity(transformer, x, t, *cond)
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
    embeds = torch.cat([uncond[0], cond[0]])
    pooled = torch.cat([uncond[1], cond[1]])
    v_u, v_c = velocity(transformer, torch.cat([x, x]), torch.cat([t, t]), embeds, pooled).chunk(2)
    return v_u + guidance_scale * (v_c - v_u)  # (CFG)


# ------------------------------------------------------- 4. rollouts and on-policy sampling (SDE)


@torch.no_grad()
def rollout(transformer, cond, uncond, latents, timesteps, guidance_scale, noise_level, generator=None,
            sde_steps=None):
    """Sample with the SDE sampler over `timesteps` (noise_level 0: the Euler ODE, = StableDiffusion3Pipeline).

    cond / uncond: (prompt_embeds, pooled_prompt_embeds), one row per latent. generator: one
    torch.Generator or a list with one per sample (then a sample's noise does not depend on its batch).
    sde_steps: only the first this many steps are SDE steps, the rest follow the ODE (MixGRPO's window;
    None: every step, as Flow-GRPO). Returns xs [B, T + 1, ...] (xs[:, 0] = latents) and log_probs [B, T]
    (0 on ODE steps).
    """
    x = latents.float()
    xs, log_probs = [x], []
    for i in range(len(timesteps) - 1):
        v = guided_velocity(transformer, x, timesteps[i], cond, uncond, guidance_scale)
        level = noise_level if sde_steps is None or i < sde_steps else 0.0
        x, log_prob, _, _ = sde_step(v, x, timesteps[i], timesteps[i + 1], level, generator=generator)
        xs.append(x)
        log_probs.append(log_prob)
    return Rollout(torch.stack(xs, 1), torch.stack(log_probs, 1))


def trained_steps(args):
    """How many leading steps of a rollout the on-policy stages train on (--timestep-fraction of --steps)."""
    return max(1, int(args.steps * args.timestep_fraction))


def step_prompts(num_prompts, batch_size, seed, step):
    """The global batch of prompt indices of a training step, a function of (seed, step) only."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(num_prompts, batch_size, replace=num_prompts < batch_size)


def group_prompt_ids(num_prompts, batch_size, group_size, seed, step):
    """Prompt index of each of a step's batch_size x group_size samples: G consecutive samples share
    one prompt, the group that (GRPO)'s advantages normalise over."""
    return np.repeat(step_prompts(num_prompts, batch_size, seed, step), group_size)


def sample_generators(seed, step, indices):
    """One CPU generator per global sample index, seeded from (seed, step, index).

    A sample's prompt and noise then do not depend on how many ranks share the batch.
    """
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed % 2**32, step % 2**32, int(i) % 2**32]).generate_state(1)[0]))
            for i in indices]


def initial_latents(pipe, resolution, generators, device):
    """x_1 ~ N(0, I) in the pipeline's latent shape, one generator per sample."""
    channels = pipe.transformer.config.in_channels
    size = resolution // pipe.vae_scale_factor
    from diffusers.utils.torch_utils import randn_tensor
    return randn_tensor((len(generators), channels, size, size), generator=list(generators), device=device,
                        dtype=torch.float32)


def on_policy_rollouts(pipe, prompts, args, step, local, guidance_scale, device, t):
    """A step's SDE rollouts of the active adapter: G consecutive samples per prompt, each sample's
    prompt and noise a function of (seed, step, global sample index). Returns this rank's
    Rollouts(prompts, cond, uncond, xs, log_probs)."""
    n_samples = args.batch_size * args.group_size
    ids = group_prompt_ids(len(prompts), args.batch_size, args.group_size, args.seed, step)
    mine = [prompts[i] for i in ids[local]]
    # each distinct prompt of the step is encoded once and its group reuses the outputs; every rank
    # encodes the same set, so that the embeddings do not depend on the number of processes
    row_of = {text: k for k, text in enumerate(dict.fromkeys(prompts[i].text for i in ids))}
    cond, uncond = encode_prompts(pipe, list(row_of), args.max_sequence_length, device)
    rows = torch.tensor([row_of[p.text] for p in mine], device=cond[0].device)
    cond, uncond = (cond[0][rows], cond[1][rows]), (uncond[0][rows], uncond[1][rows])
    gens = sample_generators(args.seed, step, range(n_samples)[local])
    sde_steps = trained_steps(args) if args.sde_window == "trained" else None
    parts = []
    with autocast(device, args.mixed_precision):
        latents = initial_latents(pipe, args.resolution, gens, device)
        for part in torch.arange(len(mine)).split(args.sample_batch):  # --sample-batch at a time
            c, u = (cond[0][part], cond[1][part]), (uncond[0][part], uncond[1][part])
            parts.append(rollout(pipe.transformer, c, u, latents[part], t, guidance_scale,
                                 args.noise_level, [gens[i] for i in part], sde_steps=sde_steps))
    xs, log_probs = torch.cat([r.xs for r in parts]), torch.cat([r.log_probs for r in parts])
    fault_point("step", step)  # tests only: FLOW_OPD_FAULT=step:N kills the run here, mid-step
    return Rollouts(mine, cond, uncond, xs, log_probs)


@torch.no_grad()
def generate(pipe, texts, generators, steps=40, guidance_scale=4.5, resolution=512, max_sequence_length=256,
             shift=3.0, batch_size=16, noise_level=0.0, device="cpu", return_latents=False):
    """Images for `texts` with the transformer's active adapter; the evaluation protocol by default
    (ODE = the Euler sampler of StableDiffusion3Pipeline, CFG). One generator per text fixes its noise.
    Returns float images [N, 3, H, W] in [0, 1] (and the final latents when return_latents)."""
    images, finals = [], []
    for i in range(0, len(texts), batch_size):
        chunk, gens = texts[i:i + batch_size], generators[i:i + batch_size]
        cond, uncond = encode_prompts(pipe, chunk, max_sequence_length, device)
        latents = initial_latents(pipe, resolution, gens, device)
        x = rollout(pipe.transformer, cond, uncond, latents, timesteps(steps, shift), guidance_scale, noise_level,
                    generator=gens).xs[:, -1]
        finals.append(x)
        images.append(decode(pipe, x).cpu())
    images = torch.cat(images)
    return (images, torch.cat(finals)) if return_latents else images


# -------------------------------------------------------------------------- 5. flow matching (FM)


def sample_train_t(batch, shift=3.0, generator=None, device=None):
    """Training times: logit-normal, then shifted like the sampler's schedule.   # (FM)"""
    u = torch.sigmoid(torch.randn(batch, generator=generator).to(device))  # (FM)
    return shift * u / (1 + (shift - 1) * u)


def add_noise(x0, noise, t):
    """x_t = (1 - t) x_0 + t eps.   # (FM)"""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise  # (FM)


def fm_loss(v_pred, x0, noise):
    """Flow matching loss || v - (eps - x_0) ||^2, mean over everything.   # (FM)"""
    return ((v_pred.float() - (noise.float() - x0.float())) ** 2).mean()  # (FM)


# --------------------------------------------------------------- 6. objectives (GRPO) (OPD) (MAR)


def group_advantages(rewards, group_size, clip=5.0, eps=1e-4):
    """Group-normalised, clipped advantages and a mask of the groups with any reward spread.   # (GRPO)

    rewards: Tensor[N] laid out as consecutive groups of group_size samples of one prompt.
    """
    r = rewards.float().view(-1, group_size)
    mean, std = r.mean(1, keepdim=True), r.std(1, unbiased=False, keepdim=True)
    adv = ((r - mean) / (std + eps)).clamp(-clip, clip)  # (GRPO)
    keep = (std > 0).expand_as(r)
    return adv.flatten(), keep.flatten()


def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range):
    """PPO clipped surrogate per sample (to minimise), whether each sample's ratio was clipped, and the
    approx-KL 0.5 (log rho)^2 per sample; callers reduce, so a loss can be a mean over all ranks.   # (GRPO)"""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))  # (GRPO)
    return loss, ((ratio - 1).abs() > clip_range).detach(), (0.5 * (log_prob - old_log_prob) ** 2).detach()


def opd_reward(student_log_prob, teacher_log_prob):
    """Dense per-step OPD reward: the sampled reverse KL at the action taken, negated and detached.   # (OPD)

    Why sampled and not the analytic KL_t: KL_t at x_t does not depend on the action x_next, so used
    as an advantage its expected policy gradient, E[KL_t grad log pi(x_next)] = KL_t E[grad log pi],
    is zero. The sampled log-ratio at x_next does depend on the action (Thinking Machines' OPD).
    """
    return -(student_log_prob - teacher_log_prob).detach()  # (OPD)


def opd_loss(kind, v_student, v_teacher, x, x_next, t, t_next, noise_level, old_log_prob=None, clip_range=1e-4):
    """Per-sample distillation loss of the student toward its routed teacher at state x_t, Tensor[B].   # (OPD)

    pg : the paper's objective: PPO-clipped surrogate with the sampled per-step reverse-KL reward
         r_t = -(log pi_s - log pi_T)(x_next) as advantage (detached; gradients flow through the ratio).
    kl : KL_t minimised directly through v_s (the released code's effective behaviour), at the
         |dt| KL_t scale of kl_penalty.
    mse: DanceOPD's velocity regression || v_s - sg(v_T) ||^2 (mean over elements).
    """
    v_teacher = v_teacher.detach()
    if kind == "pg":
        log_prob = sde_step(v_student, x, t, t_next, noise_level, x_next=x_next).log_prob
        teacher_log_prob = sde_step(v_teacher, x, t, t_next, noise_level, x_next=x_next).log_prob
        advantage = opd_reward(old_log_prob, teacher_log_prob)  # (OPD)
        return ppo_clip_loss(log_prob, old_log_prob, advantage, clip_range)[0]
    if kind == "kl":
        return kl_penalty(v_student, v_teacher, t, t_next, noise_level)  # (OPD)
    if kind == "mse":
        return ((v_student.float() - v_teacher.float()) ** 2).mean(dim=tuple(range(1, v_student.dim())))  # (OPD)
    raise ValueError(f"unknown OPD loss {kind!r}; expected pg, kl or mse")


def mar_penalty(v_student, v_anchor, t, t_next, noise_level, beta):
    """Manifold Anchor Regularization: beta KL to a frozen task-agnostic teacher, every prompt.   # (MAR)"""
    return beta * kl_penalty(v_student, v_anchor.detach(), t, t_next, noise_level)  # (MAR)


# ----------------------------------------------------------------------------- 7. routing (ROUTE)


def route(tasks, teachers):
    """Hard routing: {teacher task: indices of the prompts of that task}.   # (ROUTE)

    tasks: the task of each sample; teachers: names with a teacher. A task without one is an error.
    """
    missing = sorted(set(tasks) - set(teachers))
    if missing:
        raise ValueError(f"no teacher for task(s) {missing}; teachers given: {sorted(teachers)}")
    groups = {}
    for i, task in enumerate(tasks):
        groups.setdefault(task, []).append(i)  # (ROUTE)
    return {task: torch.tensor(idx) for task, idx in groups.items()}


# ------------------------------------------------------------------------------- 8. merge (MERGE)


def _module_names(state_dict):
    return sorted({k.rsplit(".lora_", 1)[0] for k in state_dict if ".lora_" in k})


def merge_loras(adapters, weights=None, rank=None):
    """Exact merge Delta W = sum_k w_k B_k A_k of LoRAs with the scale folded into B.   # (MERGE)

    adapters: dicts '<module>.lora_A.weight' [r, in], '<module>.lora_B.weight' [out, r]. Stacking the
    ranks is exact (rank = sum of ranks); `rank` truncates each module's merged update by SVD, which
    is the best rank-r approximation. Averaging the A's and B's separately would not be the average
    of the updates.
    """
    if not adapters:
        raise ValueError("merge_loras needs at least one adapter")
    weights = [1.0 / len(adapters)] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters")
    modules = _module_names(adapters[0])
    for k, adapter in enumerate(adapters[1:], 1):
        if _module_names(adapter) != modules:
            diff = sorted(set(_module_names(adapter)) ^ set(modules))
            raise ValueError(f"adapter {k} targets other modules than adapter 0, e.g. {diff[:3]}")
    merged = {}
    for m in modules:
        A = torch.cat([a[f"{m}.lora_A.weight"].float() for a in adapters], 0)
        B = torch.cat([w * a[f"{m}.lora_B.weight"].float() for w, a in zip(weights, adapters)], 1)  # (MERGE)
        if rank is not None:
            if rank > A.shape[0]:
                raise ValueError(f"merge rank {rank} is larger than the stacked rank {A.shape[0]} of module {m}")
            B, A = _truncate(B, A, rank)
        merged[f"{m}.lora_A.weight"], merged[f"{m}.lora_B.weight"] = A.contiguous(), B.contiguous()
    return merged


def _truncate(B, A, rank):
    """Best rank-r factors of B @ A, through QR of the thin factors (never forms the full matrix)."""
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s[:rank].sqrt()
    return (qb @ u[:, :rank] * root).float(), (root[:, None] * vh[:rank] @ qa.T).float()


def merge_teachers(teachers, weights=None, rank=None):
    """Merge the teachers' LoRAs into one: Delta W = sum_k w_k B_k A_k per module.   # (MERGE)

    teachers: {task: LoRA folder/file or hub id, PEFT or diffusers format; 'base' adds Delta W = 0}.
    weights: a list in teachers' order or a dict by task (default 1/K each; not normalised, so
    1,1,1 adds the updates). rank: SVD truncation (default: exact, rank = sum of teacher ranks).
    Returns (state, config, info): state in read_lora's form, config with scale 1 (lora_alpha = r)
    for write_lora / add_lora_from_state, info with the relative Frobenius error of the truncation.
    """
    tasks = list(teachers)
    if weights is None:
        weights = [1.0 / len(tasks)] * len(tasks)
    if isinstance(weights, dict):
        if set(weights) != set(tasks):
            raise ValueError(f"merge weights are given for {sorted(weights)}, the teachers are {sorted(tasks)}")
        weights = [weights[t] for t in tasks]
    if len(weights) != len(tasks):
        raise ValueError(f"{len(weights)} merge weights for {len(tasks)} teachers ({', '.join(tasks)})")
    loras = {}
    for task in tasks:
        if teachers[task] == "base":
            continue  # the pretrained model: its Delta W is 0, only its weight counts
        state, config = read_lora(teachers[task])
        if config.get("use_dora"):
            raise ValueError(f"teacher {task!r} ({teachers[task]}) is a DoRA adapter: its update is not B @ A")
        loras[task] = (fold_scale(state, config), config)
    if not loras:
        raise ValueError("every teacher is 'base': there is no LoRA to merge")
    check_same_modules({task: state for task, (state, _) in loras.items()}, teachers)
    ranks = {task: next(v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight"))
             for task, (state, _) in loras.items()}
    stacked = sum(ranks.values())
    if rank is not None and not 1 <= rank <= stacked:
        raise ValueError(f"--merge-rank {rank} must be between 1 and the stacked rank {stacked} "
                         f"(the sum of the teachers' ranks {ranks})")
    adapters = [state for state, _ in loras.values()]
    lora_weights = [weights[tasks.index(task)] for task in loras]
    exact = merge_loras(adapters, lora_weights)  # (MERGE)
    merged = exact if rank is None else merge_loras(adapters, lora_weights, rank)  # (MERGE) best rank-r
    r = stacked if rank is None else rank
    targets = next(iter(loras.values()))[1]["target_modules"]
    targets = sorted(targets) if isinstance(targets, (list, set)) else targets  # a list or peft's regex string
    config = {"r": r, "lora_alpha": r, "target_modules": targets}  # scale lora_alpha / r = 1: Delta W = B @ A
    info = {"teachers": dict(teachers), "weights": dict(zip(tasks, weights)), "ranks": ranks, "stacked_rank": stacked,
            "rank": r, "relative_error": 0.0 if rank is None else relative_error(exact, merged)}
    return merged, config, info


def module_shapes(state):
    """{module: (out_features, in_features)} of a LoRA state dict."""
    return {k[:-len(".lora_A.weight")]: (state[k.replace("lora_A", "lora_B")].shape[0], v.shape[1])
            for k, v in state.items() if k.endswith(".lora_A.weight")}


def check_same_modules(states, teachers):
    """Merging needs every teacher's LoRA on the same modules of the same base model; name the mismatch."""
    (first, ref), *rest = [(task, module_shapes(state)) for task, state in states.items()]
    for task, shapes in rest:
        if set(shapes) != set(ref):
            only_ref, only_task = sorted(set(ref) - set(shapes)), sorted(set(shapes) - set(ref))
            raise ValueError(f"teachers {first!r} ({teachers[first]}) and {task!r} ({teachers[task]}) target different "
                             f"modules: only {first!r} has {only_ref[:3]}, only {task!r} has {only_task[:3]}")
        for module, shape in shapes.items():
            if shape != ref[module]:
                raise ValueError(f"module {module!r} is {ref[module]} in teacher {first!r} but {shape} in {task!r}: "
                                 "are they LoRAs of different base models?")


def relative_error(exact, merged):
    """|| Delta W - Delta W_r ||_F / || Delta W ||_F over all modules, in float64."""
    error = total = 0.0
    for key in (k for k in exact if k.endswith(".lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        full = exact[b_key].double() @ exact[key].double()
        error += (full - merged[b_key].double() @ merged[key].double()).pow(2).sum().item()
        total += full.pow(2).sum().item()
    return math.sqrt(error / total) if total > 0 else 0.0


# -------------------------------------------------- 9. LoRA adapters: create, switch, read, write


def lora_config(rank=32, alpha=64, target_modules=None):
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                      target_modules=list(target_modules or LORA_TARGETS))


def lora_targets(spec):
    """--lora-targets 'a,b,...' -> peft target_modules: a module is adapted when its name is a
    target or ends in '.' + a target (so 'attn.to_q' matches blocks.N.attn.to_q, not attn2.to_q)."""
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    if not targets:
        raise ValueError(f"--lora-targets {spec!r} names no module; expected comma-separated "
                         f"module names, e.g. {','.join(LORA_TARGETS)}")
    return targets


def use_adapter(transformer, name):
    """Make adapter `name` (or the base model, name None / "base") the one used in forward passes.

    Sets only what a LoRA layer's forward reads: its active adapter and its on/off flag (peft's
    `_active_adapter` / `_disable_adapters`, pinned peft version). peft's own switches (set_adapters,
    enable_adapters, disable_adapters) also set requires_grad on every adapter's weights: they would make
    a teacher trainable and freeze the student, silently changing what the optimizer trains, and that
    bookkeeping was most of a switch's cost (docs/bench.md).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    base = name in (None, "base")
    if not base and name not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"no adapter {name!r} on the model; it has {sorted(getattr(transformer, 'peft_config', {}))}")
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module._disable_adapters = base
            if not base:
                module._active_adapter = [name]


def read_lora(path):
    """Read a LoRA as (state dict '<module>.lora_A/B.weight', config dict with r, lora_alpha, target_modules).

    path: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors, keys prefixed
    'base_model.model.', how the released Flow-GRPO teachers are stored), a diffusers LoRA folder or
    file (pytorch_lora_weights.safetensors, keys prefixed 'transformer.'), or a hub id of either.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not os.path.exists(path):
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise FileNotFoundError(f"adapter {path!r} does not exist (expected a LoRA folder or a hub id 'owner/name')")
        from huggingface_hub import snapshot_download
        try:
            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
        except Exception as e:
            raise FileNotFoundError(f"adapter {path!r} is not a local folder and could not be downloaded: {e}") from None
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    peft_file = os.path.join(folder, "adapter_model.safetensors")
    diffusers_file = path if os.path.isfile(path) else os.path.join(folder, "pytorch_lora_weights.safetensors")
    if os.path.isdir(path) and os.path.exists(peft_file):
        with open(os.path.join(folder, "adapter_config.json")) as f:
            config = json.load(f)
        state, prefix = _load_safetensors(peft_file, load_file), "base_model.model."
    elif os.path.exists(diffusers_file):
        state, prefix = _load_safetensors(diffusers_file, load_file), "transformer."
        with safe_open(diffusers_file, "pt") as f:
            meta = (f.metadata() or {}).get("lora_adapter_metadata")
        if meta is None:
            raise ValueError(f"{diffusers_file} has no lora_adapter_metadata: its LoRA scale (alpha) is unknown; "
                             "save it with save_lora_weights(..., transformer_lora_adapter_metadata=...)")
        config = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in json.loads(meta).items()}
    else:
        raise FileNotFoundError(f"no LoRA in {path!r}: expected adapter_model.safetensors + adapter_config.json "
                                "(PEFT) or pytorch_lora_weights.safetensors (diffusers)")
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    state = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
    if not _module_names(state):
        raise ValueError(f"{path!r} holds no LoRA weights (no '*.lora_A.weight' keys)")
    return state, config


def _load_safetensors(file, load_file):
    try:
        return load_file(file)
    except Exception as e:
        raise ValueError(f"cannot read {file}: {e} (a corrupt or partial download?)") from None


def lora_scale(config):
    """peft's scale of a LoRA update: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def fold_scale(state, config):
    """The same LoRA with its scale alpha / r folded into B, so Delta W = B @ A (merge_loras' form)."""
    scale = lora_scale(config)  # rank_pattern / alpha_pattern are not used by the Flow-GRPO teachers
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("LoRAs with per-module rank_pattern/alpha_pattern are not supported")
    return {k: v * scale if ".lora_B." in k else v for k, v in state.items()}


def check_lora_fits(transformer, state, name):
    """Clear error when an adapter targets modules or shapes that this transformer does not have."""
    modules = dict(transformer.named_modules())
    for m in _module_names(state):
        base = modules.get(m)
        base = getattr(base, "base_layer", base)
        if base is None or not hasattr(base, "weight"):
            raise ValueError(f"adapter {name!r} targets module {m!r}, which this model does not have: "
                             "is the adapter for another base model?")
        a, b = state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]
        if a.shape[1] != base.weight.shape[1] or b.shape[0] != base.weight.shape[0]:
            raise ValueError(f"adapter {name!r} module {m!r} has shape {tuple(b.shape[:1]) + tuple(a.shape[1:])}, "
                             f"the model's is {tuple(base.weight.shape)}: is the adapter for another base model?")


def add_lora_from_state(transformer, name, state, config, source=None):
    """Attach a LoRA given as a state dict + config under adapter name `name`; errors name `source`
    (where the LoRA came from, e.g. its path) when given."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    check_lora_fits(transformer, state, source or name)
    ranks = {state[f"{m}.lora_A.weight"].shape[0] for m in _module_names(state)}
    if len(ranks) != 1 or config["r"] not in ranks:
        raise ValueError(f"adapter {source or name!r}: config rank {config['r']} but weights have ranks {sorted(ranks)}")
    targets = _module_names(state)  # full names: a suffix like "2" of "ff.net.2" would match far too much
    transformer.add_adapter(LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=targets,
                                       use_rslora=bool(config.get("use_rslora"))), name)
    result = set_peft_model_state_dict(transformer, state, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise ValueError(f"adapter {name!r}: weights not loaded into the model: {unexpected[:3]}")


def load_lora(transformer, path, name):
    """Load a LoRA (PEFT folder, diffusers folder/file or hub id) as adapter `name` on transformer."""
    state, config = read_lora(path)
    add_lora_from_state(transformer, name, state, config, source=path)


def restore_lora(transformer, name, path):
    """Load the LoRA weights saved in a checkpoint folder into the existing adapter `name`."""
    from peft.utils import set_peft_model_state_dict
    state, _ = read_lora(path)
    result = set_peft_model_state_dict(transformer, state, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise ValueError(f"checkpoint {path!r} does not fit the {name} LoRA (--rank?): {unexpected[:3]}")


def save_lora(transformer, name, out_dir):
    """Save adapter `name` so that StableDiffusion3Pipeline.load_lora_weights(out_dir) loads it at its scale."""
    from peft.utils import get_peft_model_state_dict
    write_lora(get_peft_model_state_dict(transformer, adapter_name=name), transformer.peft_config[name].to_dict(), out_dir)


def write_lora(state, config, out_dir):
    """Write a LoRA state dict + config as a diffusers LoRA folder (the metadata keeps lora_alpha)."""
    from diffusers import StableDiffusion3Pipeline
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in dict(config).items()}
    StableDiffusion3Pipeline.save_lora_weights(out_dir, transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=config)


# --------------------------------------------------- 10. pipeline, precision, prompts and rewards


def model_defaults(model):
    """Per-model defaults the toy world stores beside its pipeline (flow_opd.json); SD3.5-M has none."""
    path = os.path.join(model, "flow_opd.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def scheduler_shift(model):
    """The shift of the model's FlowMatchEulerDiscreteScheduler, from its
    scheduler/scheduler_config.json (a local folder, or a hub id: cache or hub); None when it cannot
    be read (load_pipeline then says why, and load_stage_pipeline takes the loaded scheduler's)."""
    path = os.path.join(model, "scheduler", "scheduler_config.json")
    hub_id = not os.path.exists(model) and model.count("/") == 1 and not model.startswith(".")
    if hub_id:
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(model, "scheduler/scheduler_config.json")
        except Exception:
            return None
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return float(json.load(f).get("shift", 1.0))


def resolve_precision(mixed_precision, device):
    """--mixed-precision on `device`: the name given, or the released default (fp16 on CUDA,
    Flow-GRPO's config; fp32 elsewhere). A dtype the device cannot run is an error."""
    device = torch.device(device)
    precision = mixed_precision or ("fp16" if device.type == "cuda" else "fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--mixed-precision bf16: {torch.cuda.get_device_name(device)} cannot "
                         "compute in bf16; use fp16 or fp32")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--mixed-precision fp16 does not run on the CPU (diffusers has no fp16 "
                         "CPU pipeline); use bf16 or fp32 there")
    return precision


def weight_dtype(mixed_precision):
    """dtype of the frozen weights (transformer, text encoders) for --mixed-precision bf16/fp16,
    else fp32 (resolve_precision picks the default; the VAE and the trained LoRA: always fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def autocast(device, mixed_precision):
    """torch.autocast for bf16/fp16 (None = fp16 on GPU, fp32 on CPU); a no-op context for fp32."""
    precision = mixed_precision or ("fp16" if device.type == "cuda" else "fp32")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def load_pipeline(model, device="cpu", dtype=torch.float32):
    """A frozen StableDiffusion3Pipeline from a local diffusers folder or a hub id (--model): the
    transformer and text encoders in `dtype`, the VAE in fp32 (the released precision rule)."""
    from diffusers import StableDiffusion3Pipeline
    kwargs = {}
    if os.path.isdir(model):
        index = os.path.join(model, "model_index.json")
        if not os.path.isfile(index):
            raise ValueError(f"--model {model!r} is a folder but not a diffusers pipeline (no model_index.json)")
        with open(index) as f:
            cls = json.load(f).get("_class_name", "")
        if not cls.startswith("StableDiffusion3"):
            raise ValueError(f"--model {model!r} is a {cls or 'unknown'} pipeline; expected a StableDiffusion3Pipeline")
        if not os.path.isdir(os.path.join(model, "text_encoder_3")):
            kwargs.update(text_encoder_3=None, tokenizer_3=None)  # saved without T5 (the toy world)
    elif os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"--model {model!r}: no such diffusers folder (expected a folder with model_index.json "
                         "or a hub id like 'stabilityai/stable-diffusion-3.5-medium')")
    try:
        dtypes = {"default": dtype, "vae": torch.float32}
        pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtypes, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model!r} could not be loaded as a StableDiffusion3Pipeline: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if part is not None:
            part.requires_grad_(False)
    return pipe.to(device)


def load_stage_pipeline(args, device):
    """The frozen pipeline of a stage, under the released precision rule: the transformer (and the
    teacher adapters on it) and the text encoders in --mixed-precision's dtype, the VAE in fp32
    (decode runs in fp32); the LoRA a stage trains and its optimizer state are fp32
    (make_optimizer).
    Resolves args.mixed_precision on `device`, checks --resolution and --max-sequence-length, and
    fills --shift from the scheduler when resolve_model_args could not."""
    args.mixed_precision = resolve_precision(args.mixed_precision, device)
    pipe = load_pipeline(args.model, device, weight_dtype(args.mixed_precision))
    check_resolution(pipe, args.resolution)
    check_sequence_length(pipe, args.max_sequence_length)
    if args.shift is None:
        args.shift = float(pipe.scheduler.config.shift)
    return pipe


def check_resolution(pipe, resolution):
    """--resolution must give whole transformer patches: a multiple of the VAE factor x the patch size."""
    multiple = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    if resolution % multiple:
        raise ValueError(f"--resolution {resolution} must be a multiple of {multiple} for this model "
                         f"(VAE factor {pipe.vae_scale_factor} x patch size {pipe.transformer.config.patch_size})")


def check_sequence_length(pipe, max_sequence_length):
    """--max-sequence-length must fit the T5 tokenizer (without a T5 it only sets the padding)."""
    t5 = pipe.text_encoder_3 is not None
    limit = getattr(pipe.tokenizer_3, "model_max_length", None) if t5 else None
    if limit and max_sequence_length > limit:
        raise ValueError(f"--max-sequence-length {max_sequence_length} is above the T5 tokenizer's "
                         f"limit of {limit} tokens: pass at most {limit} (released: 128)")


@torch.no_grad()
def encode_prompts(pipe, prompts, max_sequence_length=256, device=None):
    """(cond, uncond) = ((prompt_embeds, pooled), (negative_embeds, negative_pooled)); negative = ""."""
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True,
        negative_prompt=[""] * len(prompts), max_sequence_length=max_sequence_length)
    return (embeds, pooled), (neg_embeds, neg_pooled)


@torch.no_grad()
def decode(pipe, latents, batch_size=None):
    """Latents -> images, float [B, 3, H, W] in [0, 1], batch_size latents at a time (None: all at
    once). The VAE decodes in fp32 (its dtype) also inside an autocast block, as released."""
    vae = pipe.vae
    images = []
    for part in latents.split(batch_size or max(len(latents), 1)):
        x = part.float() / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        with torch.autocast(x.device.type, enabled=False):
            image = vae.decode(x.to(vae.dtype), return_dict=False)[0]
        images.append((image.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)


def load_prompts(root, tasks, split="train"):
    """Prompts from Flow-GRPO's dataset layout, each carrying its task: list of Prompt(text, task, metadata).

    <root>/<task>/<split>_metadata.jsonl (GenEval: rows with prompt, tag, include, ...) or
    <root>/<task>/<split>.txt (one prompt a line).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data-root {root!r} does not exist; expected Flow-GRPO's dataset/ layout "
                                f"(<root>/<task>/{split}.txt or {split}_metadata.jsonl)")
    known = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    prompts = []
    for task in tasks:
        if task not in known:
            raise ValueError(f"unknown task {task!r}: {root!r} has tasks {known}")
        prompts.extend(load_prompt_file(os.path.join(root, task), task, split))
    return prompts


PROMPT_FILE_FORMS = ("a folder in Flow-GRPO's layout (<folder>/<split>_metadata.jsonl or "
                     "<folder>/<split>.txt), a .txt file (one prompt a line) or a .jsonl file "
                     "(rows with \"prompt\", GenEval's metadata)")


def load_prompt_file(path, task, split="train"):
    """The prompts of one task, as list of Prompt(text, task, metadata), from a folder in
    Flow-GRPO's layout (<path>/<split>_metadata.jsonl, else <path>/<split>.txt) or from one file:
    .jsonl (rows with "prompt", e.g. GenEval's metadata) or .txt (one prompt a line, e.g.
    T2I-CompBench's); a single file is the same for every split."""
    file = path
    if os.path.isdir(path):
        jsonl = os.path.join(path, f"{split}_metadata.jsonl")
        txt = os.path.join(path, f"{split}.txt")
        file = jsonl if os.path.isfile(jsonl) else txt
    if not os.path.isfile(file):
        world = _toy_world_above(file)
        missing = (f"{path} has no {split} prompts ({split}.txt or {split}_metadata.jsonl)"
                   if os.path.isdir(path) else f"{path} does not exist")
        if world:  # an old toy world lacks the splits added since (e.g. ood)
            raise FileNotFoundError(f"{missing}: the toy world {world} was built before that "
                                    "split existed (or the split is misspelt); rebuild it with "
                                    f"`python toy.py --out {world}`")
        if os.path.isdir(path):
            raise FileNotFoundError(f"task {task!r} has no {split} prompts: expected {txt} "
                                    f"or {jsonl}")
        raise FileNotFoundError(f"{path} does not exist; expected {PROMPT_FILE_FORMS}")
    if file.endswith(".jsonl"):
        with open(file) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if any(not isinstance(row, dict) or "prompt" not in row for row in rows):
            raise ValueError(f"{file}: every line must be a JSON object with a \"prompt\"")
        found = [Prompt(row["prompt"], task, row) for row in rows]
    elif file.endswith(".txt"):
        with open(file) as f:
            found = [Prompt(line.strip(), task, {}) for line in f if line.strip()]
    else:
        raise ValueError(f"{path} is no known prompt file; expected {PROMPT_FILE_FORMS}")
    if not found:
        raise ValueError(f"task {task!r}: {file} holds no prompts")
    return found


def _toy_world_above(path):
    """The nearest existing folder above path that holds a toy world's world.json, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isfile(os.path.join(folder, "world.json")):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def parse_tasks(spec, root):
    """--tasks: comma-separated names, or 'all' for every task folder under the data root."""
    if spec == "all":
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data-root {root!r} does not exist")
        tasks = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not tasks:
            raise ValueError(f"--data-root {root!r} holds no task folders; expected Flow-GRPO's dataset/ layout "
                             "(<root>/<task>/ with train.txt and test.txt, or *_metadata.jsonl)")
        return tasks
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks {spec!r} names no task; expected comma-separated task folders or 'all'")
    return tasks


def parse_teachers(spec):
    """--teachers 'task=adapter,task=adapter' -> {task: adapter}; adapter = LoRA folder/file, hub id or 'base'."""
    teachers = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        task, sep, adapter = item.partition("=")
        if not sep or not task or not adapter:
            raise ValueError(f"--teachers item {item!r}: expected task=adapter (e.g. ocr=out/teacher-ocr/final)")
        if task in teachers:
            raise ValueError(f"--teachers names task {task!r} twice")
        teachers[task] = adapter
    if not teachers:
        raise ValueError("--teachers is empty: expected task=adapter,...")
    return teachers


def parse_rewards(spec, tasks):
    """--reward: one spec for every task ('ocr', 'deqa:0.4,pickscore:0.6', 'mymod:fn',
    'url:http://h:8000'), or per task ('geneval=toy:reward_geneval;ocr=toy:reward_ocr'); default
    None = each task's reward named like the task."""
    if spec is None:
        return {t: t for t in tasks}
    if not re.match(r"[\w-]+=", spec):  # an '=' inside a url: query is not a task
        return {t: spec for t in tasks}
    per_task = dict(item.split("=", 1) for item in spec.split(";") if item)
    missing = sorted(set(tasks) - set(per_task))
    if missing:
        raise ValueError(f"--reward gives no reward for task(s) {missing}; it names {sorted(per_task)}")
    return per_task


def score(reward_fns, images, prompts):
    """Each sample scored by its own task's reward function -> float Tensor[B]."""
    out = torch.zeros(len(prompts))
    for task in sorted({p.task for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if p.task == task]
        values = np.asarray(reward_fns[task](images[idx], [prompts[i].text for i in idx],
                                             [prompts[i].metadata for i in idx]), dtype=np.float32)
        bad = [i for i, v in zip(idx, values) if not np.isfinite(v)]
        if bad:  # a NaN reward would silently zero its group's advantages
            raise FloatingPointError(f"the {task!r} reward is {values[idx.index(bad[0])]} for prompt "
                                     f"{prompts[bad[0]].text!r}, expected a finite number: stopping")
        out[idx] = torch.as_tensor(values)
    return out


# -------------------------------------------------------------------------------- 11. distributed


def setup_distributed(device=None, threads=None, timeout=600):
    """DDP under torchrun (nccl on GPU, gloo on CPU), or a single plain-python process.

    timeout (--ddp-timeout, seconds): how long a collective waits for the other processes. A rank
    that crashed, hung or was preempted then makes the others stop with DistributedError instead
    of waiting forever (gloo raises; nccl's watchdog aborts the process)."""
    if threads:
        torch.set_num_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        # torchrun --max-restarts hands the restarted processes the store of the dead ones: without a key
        # prefix per attempt, a rank can read a dead peer's address and fail to connect (seen with torch 2.13)
        store = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world_size, timeout=timeout)
    return Dist(rank, world_size, local_rank, device, rank == 0)


class DistributedError(RuntimeError):
    """A collective operation failed or timed out: another process crashed, hung or was preempted."""


@contextlib.contextmanager
def collective(what):
    """Turn a failed or timed-out collective into one clear DistributedError (the backend's own
    message, e.g. gloo's "Connection reset by peer", is kept at the end)."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, DistributedError) or not dist.is_initialized():
            raise
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistributedError(f"rank {dist.get_rank()} of {dist.get_world_size()}: {what} failed: another process "
                               f"crashed, hung past --ddp-timeout or was preempted ({detail})") from None


def barrier():
    if dist.is_initialized():
        with collective("waiting for the other processes (barrier)"):
            dist.barrier()


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather(tensor):
    """Concatenate a tensor's rows from every rank (identity on one process)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    with collective("gathering a tensor from every process"):
        dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_mean(value, device):
    """Mean of a float over ranks (identity on one process)."""
    t = torch.tensor(float(value), device=device, dtype=torch.float64)
    if dist.is_initialized():
        with collective("averaging a metric over processes"):
            dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


def gather_objects(obj, what="gathering objects from every process"):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-element list on one process);
    [0] of it is rank 0's object everywhere, a broadcast."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    with collective(what):
        dist.all_gather_object(out, obj)
    return out


def average_gradients(params):
    """Sum the LoRA gradients over ranks. Each rank's loss is already divided by the GLOBAL sample
    count, so the sum is the gradient of the global mean: the same update as one process."""
    if dist.is_initialized():
        with collective("summing the LoRA gradients over processes"):
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)


def broadcast_params(params):
    """Start every rank from rank 0's trainable weights."""
    if dist.is_initialized():
        with collective("broadcasting the initial LoRA from rank 0"):
            for p in params:
                dist.broadcast(p.data, 0)


def local_slice(n, rank, world_size, what="samples per step"):
    """This rank's contiguous share of n global items (n must divide evenly)."""
    if n % world_size:
        raise ValueError(f"{what} ({n}) must be divisible by the number of processes ({world_size})")
    per = n // world_size
    return slice(rank * per, (rank + 1) * per)


def minibatches(n_local, updates_per_step):
    """This process's samples split into --updates-per-step minibatches: update k trains on the samples
    j with j % U == k, the same global samples however many processes share the batch."""
    if n_local % updates_per_step:
        raise ValueError(f"samples per process ({n_local}) must divide into --updates-per-step "
                         f"({updates_per_step}) equal minibatches")
    return [torch.arange(k, n_local, updates_per_step) for k in range(updates_per_step)]


# --------------------------------------------- 12. optimizer, metrics, evaluation during training


def make_optimizer(transformer, args):
    """The transformer's trainable (LoRA) parameters in fp32, whatever the autocast dtype, and equal on
    every rank; AdamW over them and the optional EMA (--ema). Returns (params, optimizer, ema or None)."""
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    broadcast_params(params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return params, optimizer, EMA(params, args.ema) if args.ema else None


class EMA:
    """Exponential moving average of the trained LoRA weights (--ema DECAY): after every training
    step, shadow <- decay * shadow + (1 - decay) * weights, in fp32. It is saved in checkpoints and,
    when on, written as the final LoRA (save_final); training itself uses the raw weights."""

    def __init__(self, params, decay):
        check_ema(decay)
        self.params, self.decay = list(params), decay
        self.reset()

    def reset(self):
        """Start the average at the current weights."""
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self):
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state):
        """A checkpoint's EMA state; None (a checkpoint of a run without --ema) starts the average here."""
        if state is None:
            return self.reset()
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the duration of the block, the raw ones after it."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, raw):
                    p.copy_(w)


def check_ema(decay):
    """--ema: None (off) or a decay in (0, 1)."""
    if decay is not None and not 0 < decay < 1:
        raise ValueError(f"--ema must be a decay in (0, 1), e.g. 0.99, got {decay}")


def check_finite(value, what, out_dir):
    """Stop with a clear message (the last good checkpoint is kept) when a loss or KL is NaN/inf."""
    if not math.isfinite(float(value)):
        raise FloatingPointError(f"{what} is {float(value)}, expected a finite number: stopping. The last good "
                                 f"checkpoint in {out_dir!r} is intact; resume from it with --resume auto "
                                 "(consider a lower --lr)")


class MetricsLogger:
    """Rank 0 appends one JSON object per step to <out>/metrics.jsonl; on resume, rows past the
    checkpoint's step are dropped so the file reads like one uninterrupted run. report_to: loggers
    (parse_report_to) that get every numeric value of each row, and the images of log_image;
    resumed: whether the run continues from a checkpoint (wandb then continues the same run)."""

    def __init__(self, out_dir, enabled=True, resume_step=None, report_to=(), config=None,
                 file="metrics.jsonl", resumed=False):
        self.path, self.enabled = os.path.join(out_dir, file), enabled
        if enabled and resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                rows = [row for row in map(_json_or_none, f) if row is not None and row.get("step", 0) <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            os.replace(self.path + ".tmp", self.path)
        reporters = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}
        report_to = report_to if enabled else []
        self.reporters = [reporters[name](out_dir, resume_step, resumed, config)
                          for name in report_to]

    def log(self, row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            scalars = {k: v for k, v in row.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for reporter in self.reporters:
                reporter.scalars(row["step"], scalars)

    def log_image(self, step, tag, path):
        """A PNG the run wrote (an eval grid) to the loggers, at the step's number."""
        for reporter in self.reporters:
            reporter.image(step, tag, path)

    def close(self):
        for reporter in self.reporters:
            reporter.close()


class TensorBoardReporter:
    """--report-to tensorboard: event files in <out>/tensorboard (`tensorboard --logdir <out>`)."""

    def __init__(self, out_dir, resume_step=None, resumed=False, config=None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: events past the checkpoint (all, on a fresh start) are dropped, like the rows
        # of metrics.jsonl
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if config and not resumed:
            text = "\n".join(f"    {k} = {v}" for k, v in config.items())  # markdown: a code block
            self.writer.add_text("config", text, 0)

    def scalars(self, step, values):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps every step it logged

    def image(self, step, tag, path):
        from PIL import Image
        image = np.asarray(Image.open(path).convert("RGB"))
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbReporter:
    """--report-to wandb: a W&B run named after --out (project: $WANDB_PROJECT, else flow-opd;
    offline with WANDB_MODE=offline); --resume continues the same run, whose id <out>/wandb-run-id
    keeps."""

    def __init__(self, out_dir, resume_step=None, resumed=False, config=None):
        import uuid
        import wandb
        id_file = os.path.join(out_dir, "wandb-run-id")
        if resumed and os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:8]
            with open(id_file, "w") as f:
                f.write(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "flow-opd"), id=run_id,
                              resume="allow", name=os.path.basename(os.path.abspath(out_dir)),
                              dir=out_dir, config=config)

    def scalars(self, step, values):
        self.run.log(values, step=step)

    def image(self, step, tag, path):
        self.run.log({tag: self.wandb.Image(path)}, step=step)

    def close(self):
        self.run.finish()


def _json_or_none(line):
    try:
        return json.loads(line)
    except ValueError:  # an empty line, or the half-written last line of a killed run
        return None


def step_summary(row, keys):
    """A progress bar's postfix: the step's key numbers, e.g. 'reward_mean=0.512 kl=0.00123'."""
    return " ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float)))


def save_grid(images, path, nrow):
    """Save float images [B, 3, H, W] in [0, 1] as one PNG grid with `nrow` images per row."""
    from PIL import Image
    b, _, h, w = images.shape
    rows = math.ceil(b / nrow)
    grid = torch.ones(3, rows * h, nrow * w)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def save_eval_grid(pipe, prompts, args, step, guidance_scale):
    """<out>/grids/step-N.png: ODE samples of fixed test prompts and seeds, so grids of different
    steps (and runs) compare image by image."""
    images = generate(pipe, [p.text for p in prompts], sample_generators(args.seed, -1, range(len(prompts))),
                      steps=args.steps, guidance_scale=guidance_scale, resolution=args.resolution,
                      max_sequence_length=args.max_sequence_length, shift=args.shift,
                      batch_size=args.sample_batch, device=pipe.transformer.device)
    os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)
    path = os.path.join(args.out, "grids", f"step-{step + 1:05d}.png")
    save_grid(images, path, nrow=len(prompts))
    return path


def eval_items(prompts, images_per_prompt=1):
    """Items (task, i, j, prompt) of an evaluation: i counts the prompts of each task, j the images
    of a prompt (evaluate.py and the trainers' held-out evaluation)."""
    if not 1 <= images_per_prompt <= MAX_IMAGES_PER_PROMPT:
        raise ValueError(f"--images-per-prompt must be in 1..{MAX_IMAGES_PER_PROMPT}, "
                         f"got {images_per_prompt}")
    counts, items = {}, []
    for p in prompts:
        i = counts[p.task] = counts.get(p.task, -1) + 1
        items.extend(EvalItem(p.task, i, j, p) for j in range(images_per_prompt))
    return items


def eval_generators(seed, items):
    """The noise of (task, prompt i, image j): depends on nothing else, so every model sees the
    same."""
    # crc32, unlike hash(), is the same in every process
    return [sample_generators(seed, zlib.crc32(it.task.encode()),
                              [it.i * MAX_IMAGES_PER_PROMPT + it.j])[0] for it in items]


def generate_items(pipe, items, seed, steps, guidance_scale, resolution, max_sequence_length, shift,
                   batch_size, device, mixed_precision=None):
    """Float images [N, 3, H, W] in [0, 1] of the items, with the ODE sampler and their fixed
    noise."""
    with autocast(torch.device(device), mixed_precision):
        return generate(pipe, [it.prompt.text for it in items], eval_generators(seed, items),
                        steps=steps, guidance_scale=guidance_scale, resolution=resolution,
                        max_sequence_length=max_sequence_length, shift=shift,
                        batch_size=batch_size, device=device)


class HeldOut:
    """--eval-every N --eval-prompts K: the held-out metrics of a run, and its best checkpoint.

    Every N steps (and at the last) the first K test prompts of each task are sampled with the ODE
    at the eval settings (--eval-steps, the stage's CFG) and evaluate.py's noise, so the numbers
    equal `evaluate.py --limit K` on the same LoRA; each task's images are scored by its metric and
    every image by the quality metric (deqa). The values join the step's metrics row as
    heldout/<column> (and heldout/<column>_se), and heldout/average (rewards.evaluate_images).
    <out>/best/ keeps the LoRA (EMA when on) of the best heldout/<--select-by>, with best.json;
    <out>/heldout.jsonl keeps every evaluation's per-image scores.

    The hacking signature: the training signal (GRPO's reward, OPD's -KL to the teachers) rose
    while the held-out quality fell by more than 2 paired standard errors (same prompts and noise)
    since the evaluation HACKING_WINDOW - 1 back: a warning line; --stop-on-hacking stops the run.

    scorer(items, images) -> (table row with "average", per-image results): rewards.evaluate_images
    with the metrics; columns: the metric columns; signal: (name, metrics row -> training signal).
    """

    def __init__(self, args, prompts, scorer, columns, signal, guidance_scale):
        choices = sorted(columns) + ["average"]
        if args.select_by not in choices:
            raise ValueError(f"--select-by {args.select_by!r} is not a held-out metric of this "
                             f"run; choose one of {choices}")
        check_positive(eval_steps=args.eval_steps)
        self.args, self.scorer, self.signal = args, scorer, signal
        self.guidance_scale = guidance_scale
        self.items = [it for it in eval_items(prompts) if it.i < args.eval_prompts]
        self.history, self.signals, self.enabled = [], [], False

    def resume(self, resume_step, enabled):
        """Start (resume_step -1) or continue after a checkpoint's step, logging on rank 0 when
        enabled: evaluations past the checkpoint are dropped, and so is a best/ saved after it."""
        self.enabled, resumed = enabled, resume_step >= 0
        self.log = MetricsLogger(self.args.out, enabled, resume_step if resumed else None,
                                 file="heldout.jsonl")
        if not enabled:
            return
        if not resumed and os.path.exists(self.log.path):
            os.remove(self.log.path)  # a fresh run: an old run's evaluations must not compete
        with open(self.log.path, "a+") as f:
            f.seek(0)
            self.history = [row for row in map(_json_or_none, f) if row is not None]
        best_file = os.path.join(self.args.out, "best", "best.json")
        if os.path.isfile(best_file):
            with open(best_file) as f:
                if json.load(f)["step"] > resume_step:  # saved after the checkpoint: made again
                    shutil.rmtree(os.path.join(self.args.out, "best"))
        last = self.history[-1]["step"] if self.history else -1
        metrics = os.path.join(self.args.out, "metrics.jsonl")
        if resumed and os.path.exists(metrics):
            with open(metrics) as f:
                self.signals = [self.signal[1](row) for row in map(_json_or_none, f)
                                if row is not None and last < row["step"] <= resume_step]

    def best(self):
        """The best evaluation so far (a heldout.jsonl row), or None."""
        key = f"heldout/{self.args.select_by}"
        return max(self.history, key=lambda row: row[key], default=None)

    def due(self, step):
        every = self.args.eval_every
        return bool(every) and ((step + 1) % every == 0 or step + 1 == self.args.max_steps)

    def update(self, pipe, step, row, adapter_name, ema=None):
        """After training step `step`; on an evaluation step: evaluate (rank 0), add the held-out
        values to `row`, keep best/, check for hacking. Call it on every rank; returns whether the
        run stops (--stop-on-hacking)."""
        self.signals.append(self.signal[1](row))
        if not self.due(step):
            return False
        hacking = False
        if self.enabled:
            with ema.applied() if ema else contextlib.nullcontext():
                hacking = self._evaluate(pipe, step, row, adapter_name)
        stop = hacking and self.args.stop_on_hacking
        return all_mean(float(stop), pipe.transformer.device) > 0

    def _evaluate(self, pipe, step, row, adapter_name):
        args = self.args
        images = generate_items(pipe, self.items, args.seed, args.eval_steps, self.guidance_scale,
                                args.resolution, args.max_sequence_length, args.shift,
                                args.sample_batch, pipe.transformer.device, args.mixed_precision)
        table, results = self.scorer(self.items, images)
        values = {}
        for column in table["n"]:
            values[f"heldout/{column}"] = table[column]
            values[f"heldout/{column}_se"] = table["stderr"][column]
        values["heldout/average"] = table["average"]
        scores = {c: [r["scores"][c] for r in results if c in r["scores"]] for c in table["n"]}
        entry = {"step": step, "signal": float(np.mean(self.signals)), **values, "scores": scores}
        self.signals = []
        previous = self.best()
        self.history.append(entry)
        self.log.log(entry)
        key = f"heldout/{args.select_by}"
        if previous is None or entry[key] > previous[key]:
            with atomic_folder(os.path.join(args.out, "best")) as tmp:
                save_lora(pipe.transformer, adapter_name, tmp)
                with open(os.path.join(tmp, "best.json"), "w") as f:
                    json.dump({"step": step, "select_by": key, **values}, f, indent=1)
        warning = hacking_warning(self.history, self.signal[0], self.best()["step"])
        values["heldout/hacking"] = float(warning is not None)
        row.update(values)
        if warning:
            from tqdm import tqdm
            stopping = "; stopping (--stop-on-hacking)" if args.stop_on_hacking else ""
            tqdm.write(f"step {step}: {warning}{stopping}")
        return warning is not None


def hacking_warning(history, signal_name, best_step, quality="deqa"):
    """The hacking signature over held-out evaluations (HeldOut's history): the training signal
    rose and the quality metric fell by more than 2 paired standard errors since HACKING_WINDOW - 1
    evaluations back. Returns the warning sentence, or None."""
    if len(history) < HACKING_WINDOW or quality not in history[-1]["scores"]:
        return None
    then, now = history[-HACKING_WINDOW], history[-1]
    diffs = np.subtract(now["scores"][quality], then["scores"][quality])
    se = diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    if not (now["signal"] > then["signal"] and diffs.mean() < -2 * se):
        return None
    key = f"heldout/{quality}"
    return (f"reward hacking? the {signal_name} rose {then['signal']:.4g} -> {now['signal']:.4g} "
            f"while held-out {quality} fell {then[key]:.4g} -> {now[key]:.4g} (paired s.e. "
            f"{se:.2g}) since step {then['step']}; best/ holds step {best_step}")


# --------------------------------------------------------------------- 13. checkpoints and faults


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng(saved):
    """This rank's RNG state from a checkpoint's per-rank list (rank 0's when the number of processes changed)."""
    if isinstance(saved, dict):  # one state, not a list per rank
        return saved
    rank = dist.get_rank() if dist.is_initialized() else 0
    return saved[rank] if len(saved) == (dist.get_world_size() if dist.is_initialized() else 1) else saved[0]


def fault_point(where, n):
    """Test-only fault injection, read from the environment here and nowhere else.

    FLOW_OPD_FAULT=<where>:<n>[:hang] SIGKILLs this process (with ':hang': makes it stop answering)
    when it reaches `where` for step n: 'step' = the middle of training step n (after the rollouts,
    before the update), 'checkpoint' = half way through writing checkpoint n (LoRA written, state.pt
    not yet). FLOW_OPD_FAULT_RANK=r limits it to one rank. It fires only in the first attempt of a
    torchrun job (TORCHELASTIC_RESTART_COUNT 0), so that a restart with --max-restarts gets through."""
    spec = os.environ.get("FLOW_OPD_FAULT")
    rank = os.environ.get("RANK", "0")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    point, count, *action = spec.split(":")
    if point != where or int(count) != n or os.environ.get("FLOW_OPD_FAULT_RANK", rank) != rank:
        return
    if action == ["hang"]:
        time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)


def _fsync_tree(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes a rename inside the folder durable
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path):
    """Write a folder all at once: yields a temporary sibling '.tmp-<name>' to write into, then fsyncs
    it and renames it to `path` (replacing an old one). A crash leaves only the '.tmp-' folder, which
    readers never look at and the next write of `path` removes."""
    parent, name = os.path.split(os.path.normpath(path))
    parent = parent or "."
    tmp, old = os.path.join(parent, f".tmp-{name}"), os.path.join(parent, f".old-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)  # rename() cannot replace a folder that is not empty
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)


def save_checkpoint(out_dir, step, transformer, adapter_name, state):
    """Atomically write <out>/checkpoint-<step>/ (LoRA + state.pt), then point <out>/latest at it.

    Call it on EVERY rank: each rank's RNG state is gathered into state.pt (python, numpy, torch CPU
    and CUDA), rank 0 writes. Written to a temporary folder, fsynced and renamed, so a crash never
    leaves a half checkpoint where --resume auto would pick it up. `state`: the optimizer's and the
    EMA's state dicts. Returns the folder on rank 0, None on the others.
    """
    rngs = gather_objects(rng_state(), "gathering the RNG states for a checkpoint")
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    final = os.path.join(out_dir, f"checkpoint-{step}")
    with atomic_folder(final) as tmp:
        save_lora(transformer, adapter_name, tmp)
        fault_point("checkpoint", step)
        torch.save({"step": step, "rng": rngs, **state}, os.path.join(tmp, "state.pt"))
    pointer = os.path.join(out_dir, "latest.tmp")
    with open(pointer, "w") as f:  # updated last: it never names a checkpoint that is not complete
        f.write(os.path.basename(final))
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, os.path.join(out_dir, "latest"))
    _fsync_dir(out_dir)
    return final


def find_checkpoint(resume, out_dir):
    """--resume: 'auto' (the checkpoint <out>/latest names, else the newest complete one, or None
    for a fresh start), or a checkpoint folder. Half-written '.tmp-checkpoint-N' folders are ignored."""
    if resume is None:
        return None
    if resume == "auto":
        pointer = os.path.join(out_dir, "latest")
        if os.path.isfile(pointer):
            with open(pointer) as f:
                path = os.path.join(out_dir, f.read().strip())
            if os.path.isfile(os.path.join(path, "state.pt")):
                return path
        done = [d for d in os.listdir(out_dir) if d.startswith("checkpoint-")] if os.path.isdir(out_dir) else []
        done = [d for d in done if d[len("checkpoint-"):].isdigit() and os.path.isfile(os.path.join(out_dir, d, "state.pt"))]
        return os.path.join(out_dir, max(done, key=lambda d: int(d[len("checkpoint-"):]))) if done else None
    if not os.path.isfile(os.path.join(resume, "state.pt")):
        raise FileNotFoundError(f"--resume {resume!r} is not a checkpoint folder (no state.pt); "
                                "pass a <out>/checkpoint-N folder or 'auto'")
    return resume


def load_checkpoint_state(path):
    try:
        return torch.load(os.path.join(path, "state.pt"), weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {str(e)[:200]}); delete that folder "
                         "to resume from the one before it") from None


def training_state(optimizer, ema=None):
    """What a checkpoint's state.pt holds besides the step and the RNGs."""
    return {"optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema is not None else None}


def resume_training(args, transformer, adapter_name, optimizer, ema=None):
    """--resume: restore the LoRA, optimizer, EMA and this rank's RNG of a checkpoint; returns (first
    step, checkpoint or None). The data position needs no state: a step's prompts and noise are a
    function of (seed, step, sample index), and the learning rate is constant (no scheduler)."""
    checkpoint = find_checkpoint(args.resume, args.out)
    if not checkpoint:
        return 0, None
    state = load_checkpoint_state(checkpoint)
    restore_lora(transformer, adapter_name, checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state.get("ema"))
    set_rng_state(rank_rng(state["rng"]))
    return state["step"] + 1, checkpoint


def save_final(transformer, adapter_name, out_dir, ema=None):
    """<out>/final/: the trained LoRA (its EMA when --ema is on), written atomically; a LoRA folder that
    pipe.load_lora_weights(folder) loads."""
    with atomic_folder(os.path.join(out_dir, "final")) as tmp, (ema.applied() if ema else contextlib.nullcontext()):
        save_lora(transformer, adapter_name, tmp)


def print_outputs(out_dir):
    """A stage's last line: what it wrote under out_dir."""
    wrote = []
    for name, what in [("final", "the LoRA"), ("best", None), ("metrics.jsonl", None),
                       ("heldout.jsonl", None), ("grids", "eval grids"),
                       ("samples", "teacher samples"), ("tensorboard", None), ("wandb", None)]:
        path = os.path.join(out_dir, name)
        if name == "best" and os.path.isfile(os.path.join(path, "best.json")):
            with open(os.path.join(path, "best.json")) as f:
                best = json.load(f)
            what = f"step {best['step']}, {best['select_by']} {best[best['select_by']]:.4g}"
        if os.path.exists(path):
            folder = os.sep if os.path.isdir(path) else ""
            wrote.append(f"{path}{folder}" + (f" ({what})" if what else ""))
    print("wrote " + ", ".join(wrote), flush=True)


# ------------------------------------------------------------------------------- 14. command line


def add_model_args(parser, model="stabilityai/stable-diffusion-3.5-medium"):
    """Flags every stage shares. Sizes default to None = the released settings (512 px, 128 T5
    tokens) or the toy's, and --shift to the model's scheduler."""
    parser.add_argument("--model", default=model, help="diffusers SD3 folder or hub id")
    parser.add_argument("--resolution", type=int, default=None, help="image size in px (default: 512, or the toy's)")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="T5 tokens in encode_prompt; training and sampling must agree "
                             "(default: 128 as Flow-GRPO trained and evaluated, or the toy's)")
    parser.add_argument("--shift", type=float, default=None,
                        help="schedule shift of FlowMatchEulerDiscreteScheduler "
                             "(default: the model's scheduler's)")
    parser.add_argument("--device", default=None, help="default: cuda:<local rank> if available, else cpu")
    parser.add_argument("--mixed-precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype of the frozen transformer and text encoders, and of autocast "
                             "(default: fp16 on GPU, the released config, fp32 on CPU); the VAE "
                             "and the trained LoRA stay fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (1 under torchrun)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp-timeout", type=float, default=600,
                        help="seconds a process waits for the others under torchrun before it stops with an error "
                             "(a crashed, hung or preempted rank); raise it if rank 0's checkpoints or evals are slower")


def add_reward_server_args(parser):
    """Flags of the reward-server client (rewards.remote; GenEval and DeQA are served over HTTP)."""
    parser.add_argument("--reward-timeout", type=float, default=120.0, help="seconds a reward server may take per request")
    parser.add_argument("--reward-attempts", type=int, default=3,
                        help="tries per request (connection errors, timeouts and HTTP 5xx are retried), then the run "
                             "stops with an error naming the server; its checkpoints are kept")
    parser.add_argument("--reward-backoff", type=float, default=1.0,
                        help="seconds before the first retry, doubled before each further one")


def reward_server_options(args):
    """The reward-server flags as rewards.load(spec, server=...) takes them."""
    check_positive(reward_timeout=args.reward_timeout, reward_attempts=args.reward_attempts)
    if args.reward_backoff < 0:
        raise ValueError(f"--reward-backoff must be >= 0 seconds, got {args.reward_backoff}")
    return {"timeout": args.reward_timeout, "attempts": args.reward_attempts, "backoff": args.reward_backoff}


def add_training_args(parser):
    """Flags of the two on-policy stages (teacher_grpo.py, opd.py), with the paper's defaults."""
    add_optimizer_args(parser)
    parser.add_argument("--prompts-per-step", "--batch-size", dest="batch_size", type=int, default=24,
                        help="prompts per step, global over ranks (--batch-size: the old name)")
    parser.add_argument("--group-size", type=int, default=16, help="G: rollouts per prompt")
    parser.add_argument("--sample-steps", "--steps", dest="steps", type=int, default=10,
                        help="sampling steps of a rollout (--steps: the old name)")
    parser.add_argument("--noise-level", type=float, default=0.7, help="a in (SDE)")
    parser.add_argument("--timestep-fraction", type=float, default=0.99,
                        help="share of a rollout's steps trained on (0.99 of 10 = all but the last)")
    parser.add_argument("--sde-window", choices=["all", "trained"], default="all",
                        help="rollout steps that inject noise: all (Flow-GRPO) or only the trained ones, the rest "
                             "following the ODE, so the rewarded image holds no untrained noise (MixGRPO)")
    parser.add_argument("--clip-range", type=float, default=1e-4, help="PPO clip eps in (GRPO) / --loss pg")
    parser.add_argument("--updates-per-step", type=int, default=2,
                        help="optimizer updates per batch of rollouts (later ones are off-policy: PPO's ratio)")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per forward/backward")
    parser.add_argument("--sample-batch", type=int, default=8,
                        help="images sampled (rollout forward passes, x2 with CFG) and decoded at "
                             "once per process: bounds the memory of a step's rollouts (Flow-GRPO "
                             "samples 9 at a time)")
    parser.add_argument("--eval-every", type=int, default=50, help="grid of fixed test prompts every N steps (0: never)")
    parser.add_argument("--eval-prompts", type=int, default=0,
                        help="held-out metrics every --eval-every steps on the first K test "
                             "prompts of each task, and <out>/best/ (0: grids only)")
    parser.add_argument("--eval-steps", type=int, default=40,
                        help="ODE steps of the held-out evaluation")
    parser.add_argument("--eval-metrics", default="",
                        help="column=reward overrides of the held-out metrics, as in evaluate.py")
    parser.add_argument("--select-by", default="average",
                        help="held-out metric that picks <out>/best/: average (the paper's, over "
                             "the run's columns) or a column (deqa, pickscore, ...)")
    parser.add_argument("--stop-on-hacking", action="store_true",
                        help="stop when the training signal rises while the held-out DeQA falls")
    add_report_args(parser)


def add_optimizer_args(parser):
    """Flags of every trained LoRA (GRPO, OPD and the SFT cold start); a stage sets its own defaults
    with parser.set_defaults."""
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (of a fresh LoRA)")
    parser.add_argument("--alpha", type=int, default=64, help="LoRA alpha (of a fresh LoRA)")
    parser.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                        help="modules a fresh LoRA adapts, comma-separated peft target_modules "
                             "(default: Flow-GRPO's, the joint blocks' attention without SD3.5-M's "
                             "dual attention attn2)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every this many steps")
    parser.add_argument("--resume", default=None, help="'auto' (newest checkpoint in --out) or a checkpoint folder")
    parser.add_argument("--ema", type=float, default=None,
                        help="decay of an exponential moving average of the LoRA, written as the final LoRA (off: none)")


def add_report_args(parser):
    """--report-to, of every training stage."""
    parser.add_argument("--report-to", default="none",
                        help="loggers besides <out>/metrics.jsonl: none, tensorboard, wandb, or "
                             "both comma-separated (pip install tensorboard / wandb)")


def parse_report_to(spec):
    """--report-to -> the loggers' names; an unknown name or a missing package fails here."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names or any(n not in ("none", "tensorboard", "wandb") for n in names):
        raise ValueError(f"--report-to {spec!r}: expected none, tensorboard, wandb or "
                         "tensorboard,wandb")
    names = [n for n in dict.fromkeys(names) if n != "none"]
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--report-to {name} needs the {name} package: pip install {name}")
    return names


def resolve_model_args(args):
    """Fill the size flags left at None from the model's flow_opd.json (toy) or the released
    settings, and --shift from the model's scheduler config."""
    defaults = model_defaults(args.model) if os.path.isdir(args.model) else {}
    if args.resolution is None:
        args.resolution = defaults.get("resolution", 512)
    if args.max_sequence_length is None:
        args.max_sequence_length = defaults.get("max_sequence_length", 128)
    if args.shift is None:
        args.shift = scheduler_shift(args.model)
    if args.threads is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        args.threads = 1
    check_positive(resolution=args.resolution, max_sequence_length=args.max_sequence_length,
                   ddp_timeout=args.ddp_timeout, **({"threads": args.threads} if args.threads is not None else {}))
    return args


def check_positive(**values):
    """One clear error for sizes that must be positive integers (batch sizes, steps, ...)."""
    for name, value in values.items():
        if value is None or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def check_training_args(args):
    """Checks of add_training_args' flags that argparse cannot make; a bad --resume fails before any work."""
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0 (0: never), got {args.eval_every}")
    if args.eval_prompts < 0 or (args.eval_prompts and not args.eval_every):
        raise ValueError(f"--eval-prompts {args.eval_prompts} needs a number >= 0 and, when > 0, "
                         "--eval-every N > 0")
    if args.stop_on_hacking and not args.eval_prompts:
        raise ValueError("--stop-on-hacking needs held-out metrics: --eval-every N "
                         "--eval-prompts K")
    check_ema(args.ema)
    lora_targets(args.lora_targets)
    parse_report_to(args.report_to)
    find_checkpoint(args.resume, args.out)


def quiet_libraries():
    """Silence start-up noise known to be harmless on the command line: transformers' notices that
    it uses the PIL image processors (no torchvision), diffusers' notes that a pipeline without T5
    saves no text_encoder_3 (the toy world), peft's warning that a model holds several adapters
    (teachers, anchor and student share one base on purpose), the loading and saving bars of
    diffusers and transformers."""
    import logging
    import warnings
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    no_t5 = ("self.text_encoder_3=None", "self.tokenizer_3=None")
    logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(
        lambda record: not str(record.msg).startswith(no_t5))
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute",
                            category=UserWarning)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def cli(main, parse_args):
    """A stage's command-line entry: a mistake in the command line or a known fault (NaN loss, reward
    server down, a lost process) ends in one sentence on stderr, '<script>: error: ...', exit status
    2 for bad input and 1 for a fault, instead of a traceback from deep inside a library. Under
    torchrun every rank checks the same command line, so bad input is reported by rank 0 alone.
    FLOW_OPD_TRACEBACK=1 shows the traceback too."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank == 0:
        args = parse_args()
    else:  # every rank parses the same command line: rank 0 prints argparse's usage, help or error
        quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
        try:
            with quiet[0], quiet[1]:
                args = parse_args()
        except SystemExit as e:
            if e.code:
                time.sleep(RANK_ERROR_DELAY)  # rank 0 prints it meanwhile; torchrun stops this one
            raise
    quiet_libraries()
    faults = (FloatingPointError, DistributedError, ConnectionError)  # ConnectionError: a reward server
    try:
        return main(args)
    except faults + (ValueError, OSError) as e:
        if os.environ.get("FLOW_OPD_TRACEBACK"):
            raise
        message = str(e).rstrip(".")
        if isinstance(e, faults) and "--resume" not in message and getattr(args, "out", None):
            message += f"; the checkpoints in {args.out!r} are intact: rerun with --resume auto"
        if rank > 0 and not isinstance(e, faults):
            # rank 0 meets the same bad input and reports it, and torchrun then stops this process
            # during the wait; an error of this rank alone (rank 0 runs on) is reported after it
            time.sleep(RANK_ERROR_DELAY)
        where = f"rank {rank}: " if world_size > 1 and (rank > 0 or isinstance(e, faults)) else ""
        print(f"{os.path.basename(sys.argv[0])}: {where}error: {message}", file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(e, faults) else 2)
