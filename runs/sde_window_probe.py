"""What GRPO's rewards see of a toy world's base model, with noise on every rollout step (Flow-GRPO) or
only on the first, trained half (`--sde-window trained`, MixGRPO). README, "The OPD objective".

    python runs/sde_window_probe.py --world out/toy
"""
import argparse
import os
import sys

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
    p.add_argument("--timestep-fraction", type=float, default=0.5, help="the trained share of the steps")
    return p.parse_args(argv)


def main(args):
    torch.set_num_threads(1)
    pipe = common.load_pipeline(os.path.join(args.world, "base"))
    windows = {"every step (Flow-GRPO)": None, "trained steps only": common.trained_steps(args)}
    for task in toy.TASKS:
        chosen = common.load_prompts(os.path.join(args.world, "data"), [task], "test")[:args.prompts]
        metadata = [p.metadata for p in chosen] if task == "geneval" else None
        for name, sde_steps in windows.items():
            g = toy.group_spread(pipe, task, [p.text for p in chosen], metadata, args.group_size, args.steps, 0,
                                 args.noise_level, sde_steps)
            print(f"{task:9s} noise on {name:22s}: reward {g['mean']:.3f} (within-group std {g['group_std']:.3f}), "
                  f"DeQA {g['deqa']:.2f} (within-group std {g['deqa_group_std']:.2f})")


if __name__ == "__main__":
    main(parse_args())
