"""Stage 2: the student's initial policy, before on-policy distillation (the paper's
"Flow-based Cold-Start").

--init merge   (MERGE) one LoRA with Delta W = sum_k w_k B_k A_k over the teachers' LoRAs, exact by
               stacking their ranks, or the best rank-r approximation (SVD) with --merge-rank r.
               Needs no model, data or device: seconds on a CPU.
--init sft     the paper's SFT, following Flow-GRPO on teacher trajectories: route every training
               prompt to its task's teacher (ROUTE), sample it with that teacher (ODE + CFG, the
               eval settings), optionally keep the best of N by the task's reward, cache the final
               latents on disk, and fine-tune a fresh student LoRA on them with flow matching (FM).

Both write <out>/final/, a diffusers LoRA folder: `pipe.load_lora_weights(folder)` and
`opd.py --init` load it.

    python cold_start.py --init merge --out out/merge-init  # the released Flow-GRPO teachers
    torchrun --nproc_per_node 8 cold_start.py --init sft --data-root dataset --out out/sft-init
"""
import argparse
import json
import math
import os

import numpy as np
import torch
from tqdm import tqdm

import common
import rewards

PROMPTS_PER_SHARD = 64  # teacher samples are cached in shards of this many prompts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Flow-OPD stage 2: student init by LoRA merge or SFT "
                                            "on teacher samples")
    common.add_model_args(p)
    p.add_argument("--init", choices=["merge", "sft"], default="merge",
                   help="merge: (MERGE) of the teachers' LoRAs; sft: flow matching on teacher "
                        "samples")
    p.add_argument("--teachers", default=common.PAPER_TEACHERS,
                   help="task=adapter,... (LoRA folder/file or hub id, PEFT or diffusers format; "
                        "'base' = the pretrained model)")
    p.add_argument("--out", default="out/cold-start")
    # --init merge
    p.add_argument("--weights", default=None,
                   help="merge weights w_k in (MERGE), one number per teacher in --teachers order "
                        "(default: 1/K each)")
    p.add_argument("--merge-rank", type=int, default=None,
                   help="truncate the merged LoRA to this rank by SVD (default: exact, rank = sum "
                        "of teacher ranks)")
    # --init sft: teacher samples
    p.add_argument("--data-root", default="dataset",
                   help="Flow-GRPO's dataset/ folder (<task>/train.txt, ...)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated tasks or 'all' (default: every task with a teacher)")
    p.add_argument("--max-prompts", type=int, default=0,
                   help="at most this many training prompts per task (0: all)")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="teacher samples kept per prompt")
    p.add_argument("--best-of", type=int, default=1,
                   help="draw N teacher samples for each kept one and keep the best by --reward")
    p.add_argument("--reward", default=None,
                   help="the reward --best-of ranks by, as in teacher_grpo.py: one for every task "
                        "('ocr', 'deqa:0.4,pickscore:0.6') or per task "
                        "('geneval=toy:reward_geneval;ocr=toy:reward_ocr'); "
                        "default: each task's reward named like the task")
    p.add_argument("--sample-steps", "--steps", dest="steps", type=int, default=40,
                   help="teacher sampling steps, the eval setting (--steps: the old name)")
    p.add_argument("--cfg", type=float, default=4.5, help="teacher guidance scale w in (CFG)")
    p.add_argument("--sample-batch", type=int, default=8,
                   help="teacher images sampled (forward passes, x2 with CFG) and decoded at once "
                        "per process")
    # --init sft: student fine-tuning
    common.add_optimizer_args(p)
    p.set_defaults(lr=1e-4, max_steps=1000, save_every=100)
    p.add_argument("--train-shift", type=float, default=None,
                   help="shift of the logit-normal training times t (default --shift, as SD3's "
                        "LoRA training; 1: no shift, the low-noise steps trained as often as the "
                        "high-noise ones)")
    p.add_argument("--caption-dropout", type=float, default=0.0,
                   help="share of samples trained with the empty prompt, i.e. the unconditional "
                        "branch of (CFG)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (all ranks together)")
    common.add_reward_server_args(p)
    common.add_report_args(p)
    return p.parse_args(argv)


def main(args):
    if args.init == "merge":
        return init_merge(args)
    return init_sft(args)


# ----------------------------------------------------------------------------- --init merge

def init_merge(args):
    teachers = common.parse_teachers(args.teachers)
    weights = parse_weights(args.weights, teachers)
    state, config, info = common.merge_teachers(teachers, weights, args.merge_rank)  # (MERGE)
    os.makedirs(args.out, exist_ok=True)
    with common.atomic_folder(os.path.join(args.out, "final")) as tmp:
        common.write_lora(state, config, tmp)
    with open(os.path.join(args.out, "merge.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"merged {len(teachers)} teachers into a rank-{config['r']} LoRA (stacked rank "
          f"{info['stacked_rank']}, relative error {info['relative_error']:.3g}) -> "
          f"{os.path.join(args.out, 'final')}")
    return info


def parse_weights(spec, teachers):
    """--weights: one number per teacher in --teachers order; None = equal weights."""
    if spec is None:
        return None
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise ValueError(f"--weights {spec!r}: expected comma-separated numbers, "
                         "one per teacher") from None
    if len(weights) != len(teachers):
        raise ValueError(f"--weights has {len(weights)} numbers for {len(teachers)} teachers "
                         f"({', '.join(teachers)})")
    return weights


# ----------------------------------------------------------------------------- --init sft

def init_sft(args):
    common.resolve_model_args(args)
    common.check_positive(samples_per_prompt=args.samples_per_prompt, best_of=args.best_of,
                          steps=args.steps, sample_batch=args.sample_batch, rank=args.rank,
                          alpha=args.alpha, batch_size=args.batch_size, max_steps=args.max_steps,
                          save_every=args.save_every)
    if args.weights is not None or args.merge_rank is not None:
        raise ValueError("--weights and --merge-rank only apply to --init merge")
    common.check_ema(args.ema)
    targets = common.lora_targets(args.lora_targets)
    report_to = common.parse_report_to(args.report_to)
    if not 0 <= args.caption_dropout <= 1:
        raise ValueError(f"--caption-dropout {args.caption_dropout} is a share of samples: "
                         "give a number in [0, 1]")

    # 1. the training prompts of every task, each routed to its task's teacher   (ROUTE)
    teachers = common.parse_teachers(args.teachers)
    tasks = list(teachers) if args.tasks is None \
        else common.parse_tasks(args.tasks, args.data_root)
    prompts = select_prompts(common.load_prompts(args.data_root, tasks, "train"), args.max_prompts,
                             args.seed)
    # fails here, before any work, for a task without a teacher
    common.route([p.task for p in prompts], teachers)
    reward_fns = load_rewards(args.reward, tasks, common.reward_server_options(args)) \
        if args.best_of > 1 else {}
    loras = {task: common.read_lora(path) for task, path in teachers.items()
             if path != "base" and task in tasks}
    if not loras:
        raise ValueError(f"--init sft needs a LoRA teacher: every teacher of {tasks} is 'base', "
                         "the model itself")
    settings = sample_settings(args, {task: teachers[task] for task in tasks}, tasks)
    sample_dir = os.path.join(args.out, "samples")
    check_sample_cache(sample_dir, settings)
    # a bad --resume fails now, not after the teacher samples
    common.find_checkpoint(args.resume, args.out)

    dist = common.setup_distributed(args.device, args.threads, args.ddp_timeout)
    if args.batch_size % dist.world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the "
                         f"{dist.world_size} processes")
    pipe = common.load_stage_pipeline(args, dist.device)
    transformer = pipe.transformer
    adapters = {task: "base" if teachers[task] == "base" else f"teacher_{task}" for task in tasks}
    # all teachers on ONE frozen base, switched per task
    for task, (state, config) in loras.items():
        common.add_lora_from_state(transformer, adapters[task], state, config)
    if dist.is_main:
        os.makedirs(sample_dir, exist_ok=True)
        with open(os.path.join(sample_dir, "settings.json"), "w") as f:
            json.dump(settings, f, indent=2)
        counts = {task: sum(p.task == task for p in prompts) for task in tasks}
        print(f"{len(prompts)} prompts {counts}, {args.samples_per_prompt} sample(s) each, "
              f"best of {args.best_of}")

    # 2. teacher samples (ODE, CFG), best of N by the task's reward; each shard is cached once
    #    on disk
    num_shards = math.ceil(len(prompts) / PROMPTS_PER_SHARD)
    todo = [s for s in range(dist.rank, num_shards, dist.world_size)
            if not os.path.exists(shard_path(sample_dir, s))]
    for s in tqdm(todo, desc="teacher samples", disable=not dist.is_main):
        shard = sample_shard(pipe, prompts, s * PROMPTS_PER_SHARD, adapters, reward_fns, args,
                             dist.device)
        tmp = shard_path(sample_dir, s) + ".tmp"
        torch.save(shard, tmp)
        # a crash never leaves a half shard that looks done
        os.replace(tmp, shard_path(sample_dir, s))
    common.barrier()
    transformer.delete_adapters([adapters[task] for task in loras])  # the student trains alone
    shards = [torch.load(shard_path(sample_dir, s), mmap=True) for s in range(num_shards)]
    samples = [(s, i) for s, shard in enumerate(shards) for i in range(len(shard["texts"]))]
    if dist.is_main:
        images = common.decode(pipe, shards[0]["latents"][:16].to(dist.device)).cpu()
        common.save_grid(images, os.path.join(args.out, "samples.png"), nrow=4)

    # 3. a fresh student LoRA, the only trainable parameters, fine-tuned with flow matching   (FM)
    torch.manual_seed(args.seed)  # the same LoRA init on every rank
    transformer.add_adapter(common.lora_config(args.rank, args.alpha, targets), "student")
    common.use_adapter(transformer, "student")
    for name, param in transformer.named_parameters():
        param.requires_grad_(".student." in name)
    params, optimizer, ema = common.make_optimizer(transformer, args)
    next_step, checkpoint = common.resume_training(args, transformer, "student", optimizer, ema)
    start = next_step - 1 if checkpoint else 0  # the last step done; this loop counts steps from 1
    if checkpoint and dist.is_main:
        print(f"resumed from {checkpoint} at step {start}")
    logger = common.MetricsLogger(args.out, enabled=dist.is_main, resume_step=start,
                                  report_to=report_to, config=vars(args), resumed=bool(checkpoint))
    bar = tqdm(range(start + 1, args.max_steps + 1), initial=start, total=args.max_steps,
               desc="SFT", disable=not dist.is_main)
    for step in bar:
        x0, noise, t, cond = sft_batch(pipe, shards, samples, step, args, dist)  # (FM)
        with common.autocast(dist.device, args.mixed_precision):
            v = common.velocity(transformer, common.add_noise(x0, noise, t), t, *cond)  # (FM)
        loss = common.fm_loss(v, x0, noise)  # (FM)
        (loss / dist.world_size).backward()  # summed over ranks: the gradient of the global mean
        common.average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        common.check_finite(grad_norm, "the gradient norm of the flow matching loss", args.out)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema:
            ema.update()
        loss = common.all_mean(loss.item(), dist.device)
        common.check_finite(loss, "flow matching loss", args.out)
        logger.log({"step": step, "loss": loss, "grad_norm": float(grad_norm),
                    "lr": optimizer.param_groups[0]["lr"]})
        bar.set_postfix_str(f"loss={loss:.4g}", refresh=False)
        if step % args.save_every == 0 or step == args.max_steps:
            common.save_checkpoint(args.out, step, transformer, "student",
                                   common.training_state(optimizer, ema))

    # 4. the student init, a LoRA folder for pipe.load_lora_weights and opd.py --init
    if dist.is_main:
        common.save_final(transformer, "student", args.out, ema)
        logger.close()
        common.print_outputs(args.out)
    common.cleanup_distributed()


def sft_batch(pipe, shards, samples, step, args, dist):
    """This rank's share of the SFT batch of `step`: teacher latents x0, noise, training times t
    and the (caption-dropped) prompt embeddings; a function of (seed, step) on any number of
    ranks."""
    per_rank = args.batch_size // dist.world_size
    train_shift = args.shift if args.train_shift is None else args.train_shift
    global_batch = batch_indices(step, args.batch_size, len(samples), args.seed)
    positions = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)  # this rank's share of it
    batch = [samples[global_batch[p]] for p in positions]
    x0 = torch.stack([shards[s]["latents"][i] for s, i in batch]).float().to(dist.device)
    texts = [shards[s]["texts"][i] for s, i in batch]
    # one generator per global batch position: the same noise and t on any number of ranks
    generators = common.sample_generators(args.seed, step, positions)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g)
                         for g in generators]).to(dist.device)
    t = torch.cat([common.sample_train_t(1, train_shift, generator=g)
                   for g in generators]).to(dist.device)  # (FM)
    # caption dropout: a share of the samples trains the unconditional ("") branch that (CFG)
    # steers from; left out, the student LoRA moves that branch unsupervised and guidance
    # amplifies the drift
    drop = torch.tensor([torch.rand(1, generator=g).item() < args.caption_dropout
                         for g in generators])
    cond, uncond = common.encode_prompts(pipe, texts, args.max_sequence_length, dist.device)
    cond = [torch.where(drop.view(-1, *[1] * (c.dim() - 1)).to(c.device), u, c)
            for c, u in zip(cond, uncond)]
    common.fault_point("step", step)  # tests only: FLOW_OPD_FAULT=step:N kills the run here
    return x0, noise, t, cond


def select_prompts(prompts, max_prompts, seed):
    """At most max_prompts per task (a seeded random subset, in file order), or all when 0."""
    if max_prompts <= 0:
        return prompts
    keep = []
    for k, task in enumerate(dict.fromkeys(p.task for p in prompts)):
        idx = [i for i, p in enumerate(prompts) if p.task == task]
        keep += sorted(np.random.default_rng([seed, k]).permutation(idx)[:max_prompts].tolist())
    return [prompts[i] for i in keep]


def load_rewards(spec, tasks, server=None):
    """--reward, the same format as teacher_grpo.py's (common.parse_rewards) ->
    {task: fn(images, prompts, metadata)}."""
    return {task: rewards.load(name, server=server)
            for task, name in common.parse_rewards(spec, tasks).items()}


def sample_settings(args, teachers, tasks):
    """What the cached teacher samples depend on: a rerun with other values must not reuse them."""
    return {"model": args.model, "teachers": teachers, "data_root": args.data_root, "tasks": tasks,
            "max_prompts": args.max_prompts, "samples_per_prompt": args.samples_per_prompt,
            "best_of": args.best_of, "reward": args.reward if args.best_of > 1 else None,
            "steps": args.steps, "cfg": args.cfg, "resolution": args.resolution,
            "max_sequence_length": args.max_sequence_length, "shift": args.shift,
            "seed": args.seed, "prompts_per_shard": PROMPTS_PER_SHARD}


def check_sample_cache(sample_dir, settings):
    path = os.path.join(sample_dir, "settings.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        cached = json.load(f)
    changed = sorted(k for k in settings if cached.get(k) != settings[k])
    if changed:
        raise ValueError(f"the teacher samples cached in {sample_dir!r} were made with other "
                         f"{changed} ({[cached.get(k) for k in changed]}, "
                         f"now {[settings[k] for k in changed]}); "
                         "use another --out or delete that folder")


def shard_path(sample_dir, index):
    return os.path.join(sample_dir, f"shard-{index:05d}.pt")


@torch.no_grad()
def sample_shard(pipe, prompts, first, adapters, reward_fns, args, device):
    """Teacher samples for prompts[first:first + PROMPTS_PER_SHARD], as a dict of texts, tasks,
    final latents [P * S, ...] and the rewards of all best-of candidates [P * S, N] (or None).

    Sample n of kept sample s of prompt i uses the generator of global index (i S + s) N + n, so the
    cache does not depend on the number of ranks or on which rank made which shard.
    """
    shard = prompts[first:first + PROMPTS_PER_SHARD]
    S, N = args.samples_per_prompt, args.best_of
    latents, rewards = [None] * len(shard), [None] * len(shard)
    for task, idx in common.route([p.task for p in shard], adapters).items():  # (ROUTE)
        common.use_adapter(pipe.transformer, adapters[task])
        idx = idx.tolist()
        texts = [shard[i].text for i in idx for _ in range(S * N)]
        indices = [((first + i) * S + s) * N + n for i in idx for s in range(S) for n in range(N)]
        with common.autocast(device, args.mixed_precision):
            images, x0 = common.generate(pipe, texts,
                                         common.sample_generators(args.seed, 0, indices),
                                         steps=args.steps, guidance_scale=args.cfg,
                                         resolution=args.resolution,
                                         max_sequence_length=args.max_sequence_length,
                                         shift=args.shift, batch_size=args.sample_batch,
                                         device=device, return_latents=True)
        x0 = x0.float().cpu().view(len(idx), S, N, *x0.shape[1:])
        best = torch.zeros(len(idx), S, dtype=torch.long)
        reward = None
        if N > 1:
            metadata = [shard[i].metadata for i in idx for _ in range(S * N)]
            reward = torch.as_tensor(np.asarray(reward_fns[task](images, texts, metadata)),
                                     dtype=torch.float32)
            reward = reward.view(len(idx), S, N)
            best = reward.argmax(-1)
        kept = x0[torch.arange(len(idx))[:, None], torch.arange(S)[None, :], best]  # [P, S, ...]
        for j, i in enumerate(idx):
            latents[i] = kept[j]
            rewards[i] = None if reward is None else reward[j]
    return {"texts": [p.text for p in shard for _ in range(S)],
            "tasks": [p.task for p in shard for _ in range(S)],
            "latents": torch.cat(latents), "rewards": None if N == 1 else torch.cat(rewards)}


def batch_indices(step, batch_size, num_samples, seed):
    """Sample indices of the global batch at `step` (from 1): epochs over seeded permutations, so
    the data order is the same on any number of ranks and after a resume."""
    positions = range((step - 1) * batch_size, step * batch_size)
    epochs = {p // num_samples for p in positions}
    perms = {e: np.random.default_rng([seed, e]).permutation(num_samples) for e in epochs}
    return [int(perms[p // num_samples][p % num_samples]) for p in positions]


if __name__ == "__main__":
    common.cli(main, parse_args)
