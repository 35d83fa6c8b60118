"""Can the toy's tiny SD3 transformer learn which digit a prompt asks for? (README, "The toy world")

Pretrains a fresh toy pipeline with flow matching on OCR prompts only, then samples test prompts and
reads them with the toy's glyph reader. `--render glyph` draws the world's font (one colour per digit),
`--render black` the same glyphs in black ink (the font before the colours), and `--render colour` is
the control: the digit is drawn as a square of a colour the digit names, so only a global property
depends on the text.

    python runs/ocr_probe.py --steps 1200                       # 1-2 digits of the toy font
    python runs/ocr_probe.py --steps 1200 --render black        # the same glyphs in black
    python runs/ocr_probe.py --steps 1200 --one-digit           # one digit: no slot to find
    python runs/ocr_probe.py --steps 600 --one-digit --render colour
    python runs/ocr_probe.py --steps 1200 --one-digit -- --layers 4 --heads 4   # toy.py flags after --
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import toy  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="pretraining steps (toy.py's --max-steps)")
    p.add_argument("--digits", default="0123456789", help="the alphabet of the prompts")
    p.add_argument("--one-digit", action="store_true", help="prompts of one digit instead of 1-2")
    p.add_argument("--render", choices=["glyph", "black", "colour"], default="glyph")
    p.add_argument("--test-prompts", type=int, default=96)
    p.add_argument("toy_args", nargs="*", help="more toy.py flags (after --), e.g. --layers 4 --batch-size 64")
    return p.parse_args(argv)


def main(args):
    torch.set_num_threads(1)
    digits = list(args.digits)
    palette = np.random.default_rng(0).integers(0, 256, (10, 3)).astype(np.uint8)

    def prompt(rng):  # toy.ocr_prompt's draws, over the chosen alphabet
        text = "".join(rng.choice(digits, 1 if args.one_digit else int(rng.integers(1, 3))).tolist())
        return str(rng.choice(toy.OCR_TEMPLATES)).format(text)

    def render_colour(text):  # the control: the digit names the colour of a square
        image = np.full((toy.RESOLUTION, toy.RESOLUTION, 3), toy.BACKGROUND, np.uint8)
        image[8:24, 8:24] = palette[int(text.split('"')[1][0])]
        return image

    toy.ocr_prompt = prompt  # the data writer and the renderer look these up at call time
    world_font = toy.render_ocr
    if args.render == "colour":
        toy.render_ocr = render_colour
    if args.render == "black":
        toy.render_ocr = lambda p: world_font(p, inks=dict.fromkeys(toy.INKS, (25, 25, 25)))
    toy.TASK_MIX.update(geneval=0.0, ocr=1.0, pickscore=0.0)
    with tempfile.TemporaryDirectory() as out:
        world = toy.parse_args(["--out", out, "--max-steps", str(args.steps), *args.toy_args])
        toy.write_data(os.path.join(out, "data"), 2000, 8, world.seed)
        pipe = toy.build_pipeline(world)
        start = time.perf_counter()
        toy.pretrain(pipe, common.load_prompts(os.path.join(out, "data"), ["ocr"], "train"), world)
        seconds = time.perf_counter() - start
    rng = np.random.default_rng(5)
    tests = [prompt(rng) for _ in range(args.test_prompts)]
    targets = [t.split('"')[1] for t in tests]
    images = toy.sample(pipe, tests, 20, 0)
    if args.render == "colour":
        centre = images[:, 16, 16].astype(float)
        nearest = np.linalg.norm(centre[:, None] - palette[None].astype(float), axis=-1).argmin(1)
        right = nearest == np.array([int(t[0]) for t in targets])
        print(f"colour control, {args.steps} steps ({seconds:.0f} s): digit -> colour right in "
              f"{right.mean():.2f} of {len(tests)} (chance {1 / len(digits):.2f})")
        return
    reads = [toy.read_text(image) for image in images]
    slots = [a[i] == b[i] for a, b in zip(reads, targets) for i in range(min(len(a), len(b)))]
    print(f"{args.steps} steps ({seconds:.0f} s), alphabet {args.digits}, {'one digit' if args.one_digit else '1-2 digits'}: "
          f"OCR reward {toy.reward_ocr(images, tests).mean():.3f}, exact {np.mean([a == b for a, b in zip(reads, targets)]):.2f}, "
          f"digit right per read slot {np.mean(slots) if slots else 0:.2f} (chance {1 / len(digits):.2f}), "
          f"length right {np.mean([len(a) == len(b) for a, b in zip(reads, targets)]):.2f}")


if __name__ == "__main__":
    main(parse_args())
