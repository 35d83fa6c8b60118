"""One GRPO step and one OPD step (3 teachers + the MAR anchor) on SD3.5-M's exact transformer and
VAE with random weights, at the paper's settings per GPU: peak memory, step time and MFU. No hub, no
data.

    python runs/gpu_check.py --step grpo --out out/gpu_check   # a step per process: its own peak
    python runs/gpu_check.py --step opd --out out/gpu_check
    python runs/gpu_check.py --size tiny --device cpu ...      # the same on the tiny shaped world

The paper's batch per GPU: 24 prompts x 16 samples on 8 GPUs = 3 prompts (one per task) x 16 per
process, 10 SDE steps (9 trained), CFG 4.5, 512 px, 128 T5 tokens, micro-batch 8, 2 updates per
step, LoRA r 32 / alpha 64 on Flow-GRPO's targets; OPD from the exact merge of the 3 teachers
(rank 96), --loss kl, MAR 0.1. The stages' own functions run the steps (common.on_policy_rollouts,
teacher_grpo.grpo_update, opd.distill, through bench.py's grpo_step / opd_step and its Meter for
time and FLOPs). The text encoders have SD3.5-M's widths too (CLIP-L, CLIP-G, T5-XXL); their
tokenizers are character-level, written offline.
"""
import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", choices=["grpo", "opd"], required=True)
    p.add_argument("--out", default="out/gpu_check", help="gpu_check_<step>.json is written here")
    p.add_argument("--size", choices=["full", "tiny"], default="full",
                   help="SD3.5-M's widths, or the tiny world's")
    p.add_argument("--device", default="cuda")
    p.add_argument("--mixed-precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--resolution", type=int, default=None, help="default: 512 (full), 64 (tiny)")
    p.add_argument("--group-size", type=int, default=16,
                   help="samples per prompt (3 prompts, one per task)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps of a rollout")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def main(args):
    import numpy as np
    import torch
    import bench
    import common
    import rewards
    import sd35m_world
    import toy
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = common.resolve_precision(args.mixed_precision, device)
    resolution = args.resolution or (512 if args.size == "full" else 64)
    started = time.perf_counter()
    dtype = common.weight_dtype(precision)
    pipe = sd35m_world.build_pipeline(args.size, device=device, dtype=dtype)
    transformer = pipe.transformer
    build_seconds = time.perf_counter() - started
    rng = np.random.default_rng(0)
    prompts = [common.Prompt(text, task, meta or {}) for task in bench.TASKS
               for text, meta in [toy.sample_prompt(task, rng)]]
    n_local = len(prompts) * args.group_size
    flags = ["--batch-size", str(len(prompts)), "--group-size", str(args.group_size),
             "--steps", str(args.steps), "--resolution", str(resolution),
             "--max-sequence-length", "128", "--mixed-precision", precision, "--out", args.out]
    d = common.Dist(0, 1, 0, device, True)
    t = common.timesteps(args.steps, sd35m_world.SD35M_SHIFT).to(device)
    n_params = sum(p.numel() for p in transformer.parameters())
    meter = bench.Meter(device, n_params, transformer.config.patch_size)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.step == "grpo":
        import teacher_grpo
        stage = teacher_grpo.parse_args(flags)
        transformer.add_adapter(common.lora_config(stage.rank, stage.alpha), "policy")
        params, optimizer, _ = common.make_optimizer(transformer, stage)
        reward_fns = {task: rewards.load("jpeg") for task in bench.TASKS}  # cheap, with spread
        trained = list(range(common.trained_steps(stage)))

        def step():
            return bench.grpo_step(pipe, transformer, optimizer, params, reward_fns, prompts, stage,
                                   slice(0, n_local), t, trained, d, meter)
    else:
        names = [f"teacher_{task}" for task in bench.TASKS] + ["anchor"]
        teacher_fn = bench.attach_adapters(transformer, names, 32)
        merged = common.merge_loras([bench.lora_state(transformer, f"teacher_{task}")
                                     for task in bench.TASKS])
        rank = merged[next(iter(merged))].shape[0]
        common.add_lora_from_state(transformer, "student", merged, {"r": rank, "lora_alpha": rank})
        for n, p in transformer.named_parameters():
            p.requires_grad_(".student." in n)
        common.use_adapter(transformer, "student")
        import opd
        params, optimizer, _ = common.make_optimizer(transformer, opd.parse_args(flags))

        def step():
            return bench.opd_step(pipe, transformer, optimizer, params, prompts, flags,
                                  slice(0, n_local), t, d, meter, teacher_fn)
    meter.attach(transformer)
    bench.warm_up(pipe, prompts, 128, resolution, device)
    model_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = step()
    result.pop("batch", None)
    result.update(step_name=args.step, size=args.size, device=str(device), gpu=bench.gpu_name(),
                  dtype=precision, resolution=resolution, samples=n_local, params_m=n_params / 1e6,
                  build_seconds=build_seconds, model_mb=model_mb,
                  memory_mb=bench.peak_memory_mb(device, baseline_kb))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"gpu_check_{args.step}.json"), "w") as f:
        json.dump(result, f, indent=1)
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "- (no peak known for this device)"
    where = result["gpu"] or result["device"]
    print(f"{args.step}: {n_local} samples at {resolution} px, {precision}, {where}: "
          f"step {result['step_time']:.1f} s (rollout {result['rollout_time']:.1f} s), peak memory "
          f"{result['memory_mb'] / 1024:.2f} GiB, MFU {mfu}")
    return result


if __name__ == "__main__":
    main(parse_args())
