"""Stage 3: Flow-OPD, multi-teacher on-policy distillation with Manifold Anchor Regularization.

    torchrun --nproc_per_node 8 opd.py --init merge --mar 0.1          # the paper's run on SD3.5-M
    python opd.py --model out/toy/base --data-root out/toy/data \\
        --teachers geneval=...,ocr=...,pickscore=... \\
        --mar-teacher out/toy/teacher-deqa/final --out out/toy/opd      # the toy world

Per step (paper, section 5):
  1. on-policy sampling: SDE rollouts of the student, G per prompt, CFG, log-probs kept  (SDE)
  2. task routing: each prompt's task picks its teacher; a mixed batch is split per teacher  (ROUTE)
  3. dense supervision at every trained step (or K low-noise steps): teacher velocities under
     no_grad, per-step reverse KL, and the objective of --loss  (KL) (OPD)
  4. MAR: beta KL to a frozen task-agnostic teacher on every prompt  (MAR)
Student, teachers and anchor are LoRA adapters on ONE frozen base transformer, switched per
forward; only the student's LoRA is trained and synchronised across ranks.
"""
import argparse
import functools
import os
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import common

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    common.add_training_args(p)
    p.add_argument("--data-root", default="dataset",
                   help="Flow-GRPO's dataset/ layout, all tasks mixed")
    p.add_argument("--tasks", default="all",
                   help="tasks whose prompts are distilled (comma-separated or 'all')")
    p.add_argument("--teachers", default=common.PAPER_TEACHERS,
                   help="task=adapter,... (LoRA folder/file, hub id or 'base')")
    p.add_argument("--mar-teacher", default="out/teacher-deqa/final",
                   help="MAR anchor: the frozen aesthetic (DeQA:PickScore 4:6) teacher adapter, "
                        "or 'base'")
    p.add_argument("--mar", type=float, default=0.1, help="beta_mar in (MAR); 0 switches MAR off")
    p.add_argument("--route", choices=["task", "single"], default="task",
                   help="task: each prompt's own teacher (ROUTE); single: the --single-teacher "
                        "for all (ablation)")
    p.add_argument("--single-teacher", default=None,
                   help="with --route single: the task whose teacher is used")
    p.add_argument("--init", default="merge",
                   help="merge (exact merge of the teachers) | none (fresh LoRA) | PATH "
                        "(a cold-start LoRA, e.g. SFT)")
    p.add_argument("--merge-rank", type=int, default=None,
                   help="SVD-truncate the merged init to this rank")
    p.add_argument("--loss", choices=["pg", "kl", "mse"], default="kl",
                   help="objective of (OPD); see README for the choice")
    p.add_argument("--states", type=int, default=None,
                   help="supervise K low-noise states per rollout (DanceOPD) instead of every "
                        "trained step")
    p.add_argument("--out", default="out/opd")
    p.add_argument("--student-cfg", type=float, default=4.5,
                   help="w of the student's rollouts/training (1: unguided)")
    p.add_argument("--teacher-cfg", type=float, default=4.5,
                   help="w of the teachers and the anchor (CFG)")
    return p.parse_args(argv)


def validate(args, tasks, teachers):
    common.check_positive(batch_size=args.batch_size, group_size=args.group_size, steps=args.steps,
                          max_steps=args.max_steps, micro_batch=args.micro_batch,
                          updates_per_step=args.updates_per_step, save_every=args.save_every,
                          sample_batch=args.sample_batch)
    if args.noise_level <= 0:
        raise ValueError("--noise-level must be > 0 for on-policy SDE rollouts and their KL, "
                         f"got {args.noise_level}")
    common.check_training_args(args)
    n_trained = common.trained_steps(args)
    if args.states is not None and not 0 < args.states <= n_trained:
        raise ValueError(f"--states {args.states} must be between 1 and the {n_trained} trained "
                         "steps of a rollout")
    if args.route == "single" and args.single_teacher not in teachers:
        raise ValueError(f"--route single needs --single-teacher, one of {sorted(teachers)}; "
                         f"got {args.single_teacher}")
    if args.route == "task":
        # raises, listing tasks and teachers, when a task has no teacher
        common.route(tasks, teachers)
    if args.mar > 0 and not args.mar_teacher:
        raise ValueError("--mar > 0 needs an anchor: --mar-teacher ADAPTER or --mar-teacher base")
    if args.loss == "pg" and args.mar > 0:
        # pg's expected gradient is grad KL_t / D (docs/design.md), MAR's is |dt| grad KL_t: at the same
        # beta the anchor outweighs the teachers by about D |dt| (measured: docs/toy_results.md)
        warnings.warn(f"--loss pg with --mar {args.mar}: the pg gradient is 1/D of the kl form's (D latent "
                      "elements per image) while MAR keeps the kl form, so the anchor dominates and the student "
                      "drifts to it; use --loss kl, or scale --mar down by about D")
    for name, path in [*teachers.items(),
                       ("mar-teacher", args.mar_teacher if args.mar > 0 else "base")]:
        if path != "base" and not os.path.exists(path) and (path.startswith((".", "/", "~"))
                                                             or path.count("/") != 1):
            raise FileNotFoundError(f"teacher {name!r}: adapter {path!r} does not exist "
                                    "(a LoRA folder, hub id or 'base')")


def supervised_steps(args, step):
    """Trained step indices: all but the last by default; with --states K, K of the low-noise half
    (DanceOPD supervises states the student visits near the data), drawn per step from
    (seed, step)."""
    n_trained = common.trained_steps(args)
    if args.states is None:
        return list(range(n_trained))
    low_noise = list(range(n_trained // 2, n_trained)) \
        if args.states <= n_trained - n_trained // 2 else list(range(n_trained))
    rng = np.random.default_rng([args.seed, step, 7])
    return sorted(rng.choice(low_noise, args.states, replace=False).tolist())


def main(args):
    args = common.resolve_model_args(args)
    teachers = common.parse_teachers(args.teachers)
    tasks = common.parse_tasks(args.tasks, args.data_root)
    validate(args, tasks, teachers)
    d = common.setup_distributed(args.device, args.threads, args.ddp_timeout)
    prompts = common.load_prompts(args.data_root, tasks)
    heldout = None
    if args.eval_prompts:  # held-out metrics and best/, loaded before any work
        import rewards
        metrics = rewards.task_metrics(args.eval_metrics, tasks, common.model_defaults(args.model))
        heldout = common.HeldOut(args, common.load_prompts(args.data_root, tasks, "test"),
                                 functools.partial(rewards.evaluate_images, metrics), metrics,
                                 ("OPD reward (-KL to the teachers)", opd_signal), args.student_cfg)
    n_samples = args.batch_size * args.group_size
    local = common.local_slice(n_samples, d.rank, d.world_size)
    # fails early on a bad split
    common.minibatches(local.stop - local.start, args.updates_per_step)

    # 1. one frozen base; teachers, anchor and student are adapters on it
    pipe = common.load_stage_pipeline(args, d.device)
    transformer = pipe.transformer
    adapter_of = {}  # task -> adapter name, one adapter per distinct path
    for task, path in teachers.items():
        if path not in adapter_of.values() and path != "base":
            common.load_lora(transformer, path, f"teacher_{task}")
        adapter_of[task] = "base" if path == "base" else f"teacher_{task}"
    anchor = None
    if args.mar > 0:
        anchor = "base" if args.mar_teacher == "base" else "anchor"
        if anchor == "anchor":
            common.load_lora(transformer, args.mar_teacher, "anchor")
    torch.manual_seed(args.seed)
    if args.init == "merge":
        state, config, info = common.merge_teachers(
            {t: p for t, p in teachers.items() if p != "base"}, rank=args.merge_rank)
        common.add_lora_from_state(transformer, "student", state, config)
    elif args.init == "none":
        targets = common.lora_targets(args.lora_targets)
        transformer.add_adapter(common.lora_config(args.rank, args.alpha, targets), "student")
    else:
        common.load_lora(transformer, args.init, "student")
    for n, p in transformer.named_parameters():
        p.requires_grad_(".student." in n)
    common.use_adapter(transformer, "student")
    params, optimizer, ema = common.make_optimizer(transformer, args)
    lora = common.TrainedLoRA(transformer, params, optimizer, ema)
    t = common.timesteps(args.steps, args.shift).to(d.device)
    teacher_fn = functools.partial(teacher_velocities, transformer, adapter_of, anchor,
                                   cfg=args.teacher_cfg)

    start, resumed_from = common.resume_training(args, transformer, "student", optimizer, ema)
    os.makedirs(args.out, exist_ok=True)
    report_to = common.parse_report_to(args.report_to)
    logger = common.MetricsLogger(args.out, d.is_main, resume_step=start - 1,  # drops later rows
                                  report_to=report_to, config=vars(args),
                                  resumed=bool(resumed_from))
    eval_prompts = common.load_prompts(args.data_root, tasks, split="test")[:8]
    if heldout:
        heldout.resume(start - 1, d.is_main)

    bar = tqdm(range(start, args.max_steps), desc="OPD", disable=not d.is_main, initial=start,
               total=args.max_steps)
    for step in bar:
        t0 = time.time()
        # 2. on-policy SDE rollouts of the student; prompts and noise derive from
        #    (seed, step, sample index)
        batch = common.on_policy_rollouts(pipe, prompts, args, step, local, args.student_cfg,
                                          d.device, t)
        t1 = time.time()

        # 3. routing and dense per-step supervision; 4. MAR on every prompt
        routed = [p.task if args.route == "task" else args.single_teacher for p in batch.prompts]
        logs, kl_sum, kl_count = distill(lora, teacher_fn, batch, routed, t,
                                         supervised_steps(args, step), args, d)
        if ema:
            ema.update()
        t2 = time.time()

        total, opd, mar_kl = (common.all_mean(m, d.device)
                              for m in torch.stack(logs).mean(0).tolist())
        row = {"step": step, "loss": total, "opd_loss": opd, "mar_kl": mar_kl,
               **{f"kl/{task}": kl_sum[task] / kl_count[task] for task in sorted(kl_sum)},
               "lr": optimizer.param_groups[0]["lr"], "step_time": t2 - t0, "rollout_time": t1 - t0,
               "train_time": t2 - t1}
        common.check_finite(total, "the loss", args.out)
        stop = heldout.update(pipe, step, row, "student", ema) if heldout else False  # heldout/*
        logger.log(row)
        shown = ["loss", *sorted(k for k in row if k.startswith("kl/")), "mar_kl",
                 f"heldout/{args.select_by}"]
        bar.set_postfix_str(common.step_summary(row, shown), refresh=False)
        if d.is_main and args.eval_every and (step + 1) % args.eval_every == 0:
            grid = common.save_eval_grid(pipe, eval_prompts, args, step, args.student_cfg)
            logger.log_image(step, "grid", grid)
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps or stop:
            common.save_checkpoint(args.out, step, transformer, "student",
                                   common.training_state(optimizer, ema))
        common.barrier()
        if stop:
            break

    if d.is_main:
        common.save_final(transformer, "student", args.out, ema)
        logger.close()
        common.print_outputs(args.out)
    common.cleanup_distributed()
    return args.out


def opd_signal(row):
    """OPD's training signal for the hacking check: its reward, -(mean step KL to the teachers)."""
    return -float(np.mean([v for k, v in row.items() if k.startswith("kl/")]))


def distill(lora, teacher_fn, batch, routed, t, steps, args, d):
    """Steps 3 and 4 on a batch of rollouts (common.Rollouts): --updates-per-step optimizer updates
    of the student (lora: the active adapter) toward teacher_fn(tasks, x, t, cond, uncond) ->
    (v_teacher, v_anchor or None), routed per sample, on the rollout steps `steps`. Returns the
    per-state logs and the summed KL per routed task."""
    transformer, params, optimizer, _ = lora
    cond, uncond, xs, old_log_probs = batch.cond, batch.uncond, batch.xs, batch.log_probs
    logs = []
    # summed over the supervised states
    kl_per_sample = torch.zeros(xs.shape[0], dtype=torch.float64, device=xs.device)
    for mb in common.minibatches(xs.shape[0], args.updates_per_step):
        optimizer.zero_grad(set_to_none=True)
        global_count = len(mb) * d.world_size * len(steps)
        for chunk in mb.split(args.micro_batch):
            c, u = (cond[0][chunk], cond[1][chunk]), (uncond[0][chunk], uncond[1][chunk])
            chunk_tasks = [routed[j] for j in chunk.tolist()]
            for i in steps:
                x, x_next = xs[chunk, i], xs[chunk, i + 1]
                with common.autocast(d.device, args.mixed_precision):
                    v_teacher, v_anchor = teacher_fn(chunk_tasks, x, t[i], c, u)
                    v = common.guided_velocity(transformer, x, t[i], c, u, args.student_cfg)
                loss = common.opd_loss(args.loss, v, v_teacher, x, x_next, t[i], t[i + 1],
                                       args.noise_level, old_log_probs[chunk, i], args.clip_range)
                mar = common.mar_penalty(v, v_anchor, t[i], t[i + 1], args.noise_level, args.mar) \
                    if v_anchor is not None else torch.zeros_like(loss)
                ((loss + mar).sum() / global_count).backward()
                with torch.no_grad():  # metrics, kept on the device: no host sync per state
                    kl_per_sample[chunk] += common.step_kl(v, v_teacher, t[i], t[i + 1],
                                                           args.noise_level).double()
                    mar_kl = common.step_kl(v, v_anchor, t[i], t[i + 1], args.noise_level).mean() \
                        if v_anchor is not None else torch.zeros(())
                logs.append(torch.stack([(loss + mar).mean(), loss.mean(), mar_kl]).detach())
        common.average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        common.check_finite(grad_norm, "the gradient norm (NaN KL or loss?)", args.out)
        optimizer.step()
    kl_per_sample = kl_per_sample.tolist()
    kl_sum, kl_count = {}, {}
    for task, value in zip(routed, kl_per_sample):
        kl_sum[task] = kl_sum.get(task, 0.0) + value
        kl_count[task] = kl_count.get(task, 0) + len(steps)
    return logs, kl_sum, kl_count


@torch.no_grad()
def teacher_velocities(transformer, adapter_of, anchor, tasks, x, t, cond, uncond, cfg):
    """Routed teacher velocities (one batched forward per distinct teacher) and the anchor's, then
    the student's adapter is active again."""
    v_teacher = torch.empty(x.shape, device=x.device)
    for task, idx in common.route(tasks, adapter_of).items():  # (ROUTE)
        idx = idx.to(x.device)
        common.use_adapter(transformer, adapter_of[task])
        v_teacher[idx] = common.guided_velocity(transformer, x[idx], t,
                                                (cond[0][idx], cond[1][idx]),
                                                (uncond[0][idx], uncond[1][idx]), cfg)
    v_anchor = None
    if anchor:
        common.use_adapter(transformer, anchor)
        v_anchor = common.guided_velocity(transformer, x, t, cond, uncond, cfg)
    common.use_adapter(transformer, "student")
    return v_teacher, v_anchor


if __name__ == "__main__":
    common.cli(main, parse_args)
