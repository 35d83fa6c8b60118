"""Stage 1: Flow-GRPO. Trains one LoRA teacher on one task's prompts with one reward; given several
tasks (and each task's reward) it is the paper's mixed-reward GRPO baseline.

    python teacher_grpo.py --model out/toy/base --data-root out/toy/data --tasks ocr \\
        --reward toy:reward_ocr --out out/teacher-ocr
    torchrun --nproc_per_node 8 teacher_grpo.py --data-root dataset --tasks ocr \\
        --out out/teacher-ocr

Per step (Flow-GRPO): SDE rollouts of G images per prompt with CFG, log-probs kept; rewards;
group-normalised advantages (GRPO); PPO-clipped surrogate on each trained step plus beta x KL to
the base model (the adapter switched off: no second copy of the model).
"""
import argparse
import functools
import os
import time

import torch
from tqdm import tqdm

import common
import rewards


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    common.add_training_args(p)
    p.add_argument("--data-root", default="dataset", help="Flow-GRPO's dataset/ layout")
    p.add_argument("--tasks", default="geneval",
                   help="comma-separated tasks whose train prompts are used, or 'all'")
    p.add_argument("--reward", default=None,
                   help="reward spec for all tasks ('ocr', 'deqa:0.4,pickscore:0.6') or per task "
                        "('geneval=geneval;ocr=ocr'); default: each task's own reward")
    p.add_argument("--out", default="out/teacher")
    p.add_argument("--cfg", type=float, default=4.5, help="w in (CFG)")
    p.add_argument("--adv-clip", type=float, default=5.0, help="advantage clip in (GRPO)")
    p.add_argument("--kl-beta", type=float, default=0.04,
                   help="beta of the KL to the base model in (GRPO)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this wall time (e.g. to give a baseline the same budget as "
                        "another method)")
    common.add_reward_server_args(p)
    return p.parse_args(argv)


def validate(args):
    common.check_positive(batch_size=args.batch_size, steps=args.steps, max_steps=args.max_steps,
                          micro_batch=args.micro_batch, updates_per_step=args.updates_per_step,
                          save_every=args.save_every, sample_batch=args.sample_batch)
    if args.group_size < 2:
        raise ValueError("--group-size must be >= 2 (the group advantage of one sample is "
                         f"undefined), got {args.group_size}")
    if not 0 < args.timestep_fraction <= 1:
        raise ValueError(f"--timestep-fraction must be in (0, 1], got {args.timestep_fraction}")
    common.check_training_args(args)


def main(args):
    validate(args)
    args = common.resolve_model_args(args)
    d = common.setup_distributed(args.device, args.threads, args.ddp_timeout)
    tasks = common.parse_tasks(args.tasks, args.data_root)
    prompts = common.load_prompts(args.data_root, tasks)
    server = common.reward_server_options(args)
    reward_fns = {task: rewards.load(spec, server=server)
                  for task, spec in common.parse_rewards(args.reward, tasks).items()}
    heldout = None
    if args.eval_prompts:  # held-out metrics and best/, loaded before any work
        model_info = common.model_defaults(args.model)
        metrics = rewards.task_metrics(args.eval_metrics, tasks, model_info, server)
        heldout = common.HeldOut(args, common.load_prompts(args.data_root, tasks, "test"),
                                 functools.partial(rewards.evaluate_images, metrics), metrics,
                                 ("training reward", lambda row: row["reward_mean"]), args.cfg)
    n_samples = args.batch_size * args.group_size
    local = common.local_slice(n_samples, d.rank, d.world_size)
    # fails early on a bad split
    common.minibatches(local.stop - local.start, args.updates_per_step)

    # the policy: a LoRA on the frozen base; the KL reference is the same base with the adapter off
    pipe = common.load_stage_pipeline(args, d.device)
    transformer = pipe.transformer
    torch.manual_seed(args.seed)
    targets = common.lora_targets(args.lora_targets)
    transformer.add_adapter(common.lora_config(args.rank, args.alpha, targets), "policy")
    params, optimizer, ema = common.make_optimizer(transformer, args)
    lora = common.TrainedLoRA(transformer, params, optimizer, ema)
    t = common.timesteps(args.steps, args.shift).to(d.device)
    train_steps = list(range(common.trained_steps(args)))

    start, resumed_from = common.resume_training(args, transformer, "policy", optimizer, ema)
    os.makedirs(args.out, exist_ok=True)
    report_to = common.parse_report_to(args.report_to)
    logger = common.MetricsLogger(args.out, d.is_main, resume_step=start - 1,  # drops later rows
                                  report_to=report_to, config=vars(args),
                                  resumed=bool(resumed_from))
    eval_prompts = common.load_prompts(args.data_root, tasks, split="test")[:8]
    if heldout:
        heldout.resume(start - 1, d.is_main)

    began = time.time()
    bar = tqdm(range(start, args.max_steps), desc="GRPO", disable=not d.is_main, initial=start,
               total=args.max_steps)
    for step in bar:
        t0 = time.time()
        # 1. on-policy SDE rollouts: every sample's prompt and noise derive from
        #    (seed, step, sample index)
        batch = common.on_policy_rollouts(pipe, prompts, args, step, local, args.cfg, d.device, t)
        t1 = time.time()

        # 2. rewards and group-relative advantages (group statistics over all ranks)   (GRPO)
        images = common.decode(pipe, batch.xs[:, -1], args.sample_batch)
        rewards_local = common.score(reward_fns, images, batch.prompts).to(d.device)
        all_rewards = common.all_gather(rewards_local)
        advantages, keep = common.group_advantages(all_rewards, args.group_size, args.adv_clip)
        advantages, keep = advantages[local], keep[local]
        t2 = time.time()

        # 3. PPO-clipped surrogate + beta KL to the base, on each trained step. Groups whose
        #    rewards are all equal carry no signal and are dropped (masked); a batch of only such
        #    groups is skipped.
        if not keep.any() and d.is_main:
            tqdm.write(f"step {step}: every group has zero reward variance; no update this step")
        logs = grpo_update(lora, batch, advantages, keep, t, train_steps, args, d) \
            if keep.any() else []
        if ema:
            ema.update()
        t3 = time.time()

        means = torch.stack(logs).mean(0).tolist() if logs else [0.0] * 4
        loss, kl, clip_frac, approx_kl = (common.all_mean(m, d.device) for m in means)
        row = {"step": step, "loss": loss,
               "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
               "zero_std_groups": int((~keep).sum().item() // args.group_size),
               "kl": kl, "clip_frac": clip_frac, "approx_kl": approx_kl,
               "lr": optimizer.param_groups[0]["lr"], "step_time": t3 - t0, "rollout_time": t1 - t0,
               "reward_time": t2 - t1, "train_time": t3 - t2}
        common.check_finite(row["loss"], "the loss", args.out)
        stop = heldout.update(pipe, step, row, "policy", ema) if heldout else False  # heldout/*
        logger.log(row)
        shown = ("reward_mean", "kl", f"heldout/{args.select_by}")
        bar.set_postfix_str(common.step_summary(row, shown), refresh=False)
        if d.is_main and args.eval_every and (step + 1) % args.eval_every == 0:
            grid = common.save_eval_grid(pipe, eval_prompts, args, step, args.cfg)
            logger.log_image(step, "grid", grid)
        out_of_time = args.max_minutes is not None \
            and common.all_mean(time.time() - began, d.device) > 60 * args.max_minutes
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps or out_of_time or stop:
            common.save_checkpoint(args.out, step, transformer, "policy",
                                   common.training_state(optimizer, ema))
        common.barrier()
        if out_of_time or stop:
            break

    if d.is_main:
        common.save_final(transformer, "policy", args.out, ema)
        logger.close()
        common.print_outputs(args.out)
    common.cleanup_distributed()
    return args.out


def grpo_update(lora, batch, advantages, keep, t, train_steps, args, d):
    """Step 3 on a batch of rollouts (common.Rollouts): --updates-per-step optimizer updates of the
    policy (lora: the active adapter) with the PPO-clipped surrogate + beta KL to the base (the
    adapter switched off), on the rollout steps `train_steps`. Returns per-state logs."""
    transformer, params, optimizer, _ = lora
    cond, uncond, xs, old_log_probs = batch.cond, batch.uncond, batch.xs, batch.log_probs
    logs = []
    for mb in common.minibatches(xs.shape[0], args.updates_per_step):
        optimizer.zero_grad(set_to_none=True)
        # each loss term is 1/N of the global mean
        global_count = len(mb) * d.world_size * len(train_steps)
        for chunk in mb.split(args.micro_batch):
            c, u = (cond[0][chunk], cond[1][chunk]), (uncond[0][chunk], uncond[1][chunk])
            for i in train_steps:
                x, x_next = xs[chunk, i], xs[chunk, i + 1]
                with common.autocast(d.device, args.mixed_precision):
                    v = common.guided_velocity(transformer, x, t[i], c, u, args.cfg)
                    if args.kl_beta > 0:
                        with torch.no_grad():
                            common.use_adapter(transformer, "base")
                            v_ref = common.guided_velocity(transformer, x, t[i], c, u, args.cfg)
                            common.use_adapter(transformer, "policy")
                log_prob = common.sde_step(v, x, t[i], t[i + 1], args.noise_level,
                                           x_next=x_next).log_prob
                policy_loss, clipped, approx_kl = common.ppo_clip_loss(
                    log_prob, old_log_probs[chunk, i], advantages[chunk], args.clip_range)
                kl = common.kl_penalty(v, v_ref, t[i], t[i + 1], args.noise_level) \
                    if args.kl_beta > 0 else torch.zeros_like(policy_loss)
                loss = (policy_loss + args.kl_beta * kl) * keep[chunk]
                (loss.sum() / global_count).backward()
                logs.append(torch.stack([loss.mean(), kl.mean(), clipped.float().mean(),
                                         approx_kl.mean()]).detach())
        common.average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        common.check_finite(grad_norm, "the gradient norm", args.out)
        optimizer.step()
    return logs


if __name__ == "__main__":
    common.cli(main, parse_args)
