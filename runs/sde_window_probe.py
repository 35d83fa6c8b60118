"""What GRPO's rewards see of a toy world's base model, with noise on every rollout step (Flow-GRPO) or
only on the first, trained half (`--sde-window trained`, MixGRPO). README, "The OPD objective".

    python runs/sde_window_probe.py --world out/toy8
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import toy  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="out/toy", help="a folder built by toy.py (base/, data/)")
    p.add_argument("--prompts", type=int, default=16, help="test prompts per task")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--noise-level", type=float, default=0.7)
    return p.parse_args(argv)


def main(args):
    torch.set_num_threads(1)
    pipe = common.load_pipeline(os.path.join(args.world, "base"))
    t = common.timesteps(args.steps)
    windows = {"every step (Flow-GRPO)": None, "trained half only": max(1, int(args.steps * 0.5))}
    for task in toy.TASKS:
        chosen = common.load_prompts(os.path.join(args.world, "data"), [task], "test")[:args.prompts]
        texts = [p.text for p in chosen for _ in range(args.group_size)]
        rows = [p.metadata for p in chosen for _ in range(args.group_size)] if task == "geneval" else None
        cond, uncond = common.encode_prompts(pipe, texts, max_sequence_length=1)
        for name, sde_steps in windows.items():
            generators = common.sample_generators(0, 0, range(len(texts)))
            latents = common.initial_latents(pipe, toy.RESOLUTION, generators, "cpu")
            xs, _ = common.rollout(pipe.transformer, cond, uncond, latents, t, 4.5, args.noise_level,
                                   generator=generators, sde_steps=sde_steps)
            images = toy.to_uint8(common.decode(pipe, xs[:, -1]).permute(0, 2, 3, 1).numpy())
            reward = toy.TOY_REWARDS[task](images, texts, rows).reshape(len(chosen), -1)
            deqa = toy.reward_deqa(images).reshape(len(chosen), -1)
            print(f"{task:9s} noise on {name:22s}: reward {reward.mean():.3f} (within-group std "
                  f"{reward.std(1).mean():.3f}), DeQA {deqa.mean():.2f} (within-group std {deqa.std(1).mean():.2f})")


if __name__ == "__main__":
    main(parse_args())
