"""The toy world: a tiny SD3 pipeline, three tasks shaped like the paper's and exact rewards, on a laptop CPU.

    python toy.py --out out/toy            # ~4 CPU minutes: <out>/base (pipeline), <out>/data (prompts)
    python toy.py --out out/toy --quick    # ~20 s, for tests: same layout, barely trained

Images are 32 x 32 px. A scene is coloured shapes (square, bar, tower in six colours), a string
of digits in a 3 x 5 bit font (one bit = one 4 px patch, one colour per digit), or one big striped
subject on a day or night background. Objects without a colour in the prompt have their shape's
natural colour and every scene has one canonical layout, so that a 0.4M-parameter model learns to
follow prompts, imperfectly, in minutes:

    geneval    "a photo of three squares", "a photo of a red bar and a blue tower", ...
               GenEval's six tags and metadata (include/exclude, position [rel, index]).
    ocr        'a sign that says "47"': 1-2 digits between double quotes.
    pickscore  "a green tower at night, highly detailed": a "human preference" rule.

Splits, in Flow-GRPO's layout under <out>/data: pretrain (the base's pretraining prompts), train
and test (the post-training stages' prompts and the table's), and ood: prompts made only of
combinations (HELD_OUT: colour-shape pairs, counts, pairs and positions of shapes, digit pairs) that
no train or test prompt contains, for the out-of-distribution columns; <out>/data/ood.json lists them.

Rewards, each f(images uint8 [B, H, W, 3], prompts, metadata) -> float [B] (GenEval: columns), named
`toy:reward_geneval`, ... in reward specs (rewards.py imports them from here when asked):

    reward_geneval    Flow-GRPO's partial-credit GenEval score over a rule-based shape detector
                      ("reward"), with GenEval's strict per-image "correct" and "tag", the columns
                      of the real GenEval reward server.
    reward_ocr        the real OCR reward's formula (rewards.ocr_score) over a template glyph reader
                      (it reads shape only; the colours only make the font learnable).
    reward_pickscore  in [0, 1] (like PickScore / 26): asked colour x big subject x asked background x
                      asked shape x detail (texture energy in the subject). Cheap statistics: hackable.
    reward_deqa       quality on DeQA's 1-5 scale: a subject on a background, not washed out, no
                      pixel noise, no specks.

Why they conflict: PickScore pays for texture energy, which pixel noise supplies more cheaply than
stripes; DeQA and both detectors are hurt by exactly that noise (hacking and the seesaw). GenEval and
OCR need small, sharp, flat-coloured parts where PickScore pays for one big textured subject.

The pipeline is a real diffusers StableDiffusion3Pipeline folder: SD3Transformer2DModel (patch 4 on
pixels), two tiny frozen random CLIP text encoders with a BPE tokenizer trained here on the toy
vocabulary, no T5, and an AutoencoderKL whose hand-set weights make it an exact identity (pixel space).
<out>/base/flow_opd.json tells the stages its resolution, max_sequence_length = 1 and, for
evaluate.py and the held-out evaluation during training, its metrics (toy:reward_*) and scales.
"""
import argparse
import hashlib
import itertools
import json
import os
import shutil
import time

import cv2
import numpy as np
import torch

import common
import rewards

RESOLUTION = 32
BACKGROUND = (240, 240, 240)
NIGHT = (25, 30, 70)
INKS = {  # the font's colours, one per digit (fridge-magnet digits): a tiny DiT learns a digit's colour from the
    # prompt in minutes and then a glyph's shape from its colour in the image; black glyphs it did not learn
    # (runs/ocr_probe.py). The reader reads shape only: every ink is over 200 from the background in RGB.
    "0": (220, 40, 40), "1": (245, 140, 20), "2": (200, 180, 0), "3": (40, 170, 70), "4": (40, 90, 230),
    "5": (150, 60, 200), "6": (0, 150, 150), "7": (180, 0, 120), "8": (120, 80, 20), "9": (90, 90, 90)}
INK_DISTANCE = 200.0  # RGB distance from the background at which a pixel counts as full ink
COLORS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 210, 40),
          "green": (40, 170, 70), "blue": (40, 90, 230), "purple": (150, 60, 200)}
SHAPES = ["square", "bar", "tower"]  # told apart by aspect ratio, which a patch-4 model can learn in minutes
NATURAL = {"square": "blue", "bar": "red", "tower": "green"}  # a shape's colour when the prompt names none,
# as a banana is yellow unless asked otherwise: prompts without colours have one right picture per layout
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ["left of", "right of", "above", "below"]
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
OCR_TEMPLATES = ['a sign that says "{}"', 'a poster that reads "{}"', 'a label that shows "{}"']
PICK_BACKGROUNDS = {"at night": NIGHT, "in daylight": BACKGROUND}
PICK_STYLES = ["highly detailed", "intricate"]
FONT = {  # 3 x 5 bits per digit; every glyph spans its whole cell, so a glyph's ink box is its cell
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111"}
GLYPHS = {d: np.array([int(c) for c in bits], dtype=np.float32).reshape(5, 3) for d, bits in FONT.items()}
GLYPH_SCALE = 4  # 12 x 20 px glyphs: each bit of the font is one 4 px patch of the model
TASKS = ["geneval", "ocr", "pickscore"]
TASK_MIX = {"geneval": 0.3, "ocr": 0.5, "pickscore": 0.2}  # pretraining's share of each task: one big subject is
# learned first. OCR 0.5 puts its base mid-range: with 0.4 it read 0.18; 0.4 for 7,000 steps gave OCR 0.51 but
# GenEval 0.64, where GRPO no longer raised GenEval (README, "The toy world")


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def vocabulary():
    """Every word a toy prompt can contain: the tokenizer is trained on exactly these."""
    words = {"a", "an", "photo", "of", "and", '"', ","} | set(COLORS) | set(NUMBERS.values()) | set(FONT)
    words |= set(SHAPES) | {s + "s" for s in SHAPES}
    for phrase in RELATIONS + OCR_TEMPLATES + list(PICK_BACKGROUNDS) + PICK_STYLES:
        words |= set(phrase.replace('"{}"', "").split())
    return sorted(words)


# ----------------------------------------------------------------------------- prompts

def geneval_row(tag, rng):
    """One GenEval-style metadata row (prompt, tag, include[, exclude]) of the given tag."""
    s1, s2 = rng.choice(SHAPES, 2, replace=False).tolist()
    c1, c2 = rng.choice(list(COLORS), 2, replace=False).tolist()
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": s1, "count": 1}], "prompt": f"a photo of a {s1}"}
    if tag == "two_object":
        return {"tag": tag, "include": [{"class": s1, "count": 1}, {"class": s2, "count": 1}],
                "prompt": f"a photo of a {s1} and a {s2}"}
    if tag == "counting":
        n = int(rng.choice(list(NUMBERS)))
        return {"tag": tag, "include": [{"class": s1, "count": n}], "exclude": [{"class": s1, "count": n + 1}],
                "prompt": f"a photo of {NUMBERS[n]} {s1}s"}
    if tag == "colors":
        return {"tag": tag, "include": [{"class": s1, "count": 1, "color": c1}],
                "prompt": f"a photo of {article(c1)} {c1} {s1}"}
    if tag == "position":
        rel = str(rng.choice(RELATIONS))
        return {"tag": tag, "include": [{"class": s1, "count": 1}, {"class": s2, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of a {s2} {rel} a {s1}"}
    if tag == "color_attr":
        return {"tag": tag, "include": [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}],
                "prompt": f"a photo of {article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}"}
    raise ValueError(f"unknown GenEval tag {tag!r}")


def ocr_prompt(rng):
    text = "".join(rng.choice(list(FONT), int(rng.integers(1, 3))).tolist())
    return str(rng.choice(OCR_TEMPLATES)).format(text)


def pickscore_prompt(rng):
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    return f"{article(color)} {color} {shape} {rng.choice(list(PICK_BACKGROUNDS))}, {rng.choice(PICK_STYLES)}"


def sample_prompt(task, rng, tag=None):
    """(prompt, metadata row or None) for a task; GenEval draws its tag uniformly unless given."""
    if task == "geneval":
        row = geneval_row(tag or str(rng.choice(TAGS)), rng)
        return row["prompt"], row
    if task == "ocr":
        return ocr_prompt(rng), None
    if task == "pickscore":
        return pickscore_prompt(rng), None
    raise ValueError(f"unknown toy task {task!r}")


def parse_pickscore(prompt):
    """'a red bar at night, highly detailed' -> ('red', 'bar', NIGHT)."""
    words = prompt.replace(",", " ").split()
    color = next(w for w in words if w in COLORS)
    shape = next(w for w in words if w in SHAPES)
    background = next(rgb for phrase, rgb in PICK_BACKGROUNDS.items() if phrase in prompt)
    return color, shape, background


# ----------------------------------------------------------------------------- ground-truth renders

def shape_mask(shape, box, res=RESOLUTION):
    """Pixel mask of a shape centred in box = (x0, y0, size): a square fills it, a bar is half as tall,
    a tower half as wide."""
    x0, y0, size = box
    w, h = {"square": (size, size), "bar": (size, size // 2), "tower": (size // 2, size)}[shape]
    x, y = x0 + (size - w) // 2, y0 + (size - h) // 2
    mask = np.zeros((res, res), bool)
    mask[y:y + h, x:x + w] = True
    return mask


def place_boxes(sizes, relation=None):
    """Boxes (x0, y0, size): one object in the centre, several in 16 px quadrants in reading order.

    One canonical layout per prompt (with a relation: the first quadrant order in which box 1 is
    `relation` box 0, as GenEval judges it) keeps scenes learnable by a tiny model in minutes; the
    detector and GenEval's rules accept any layout.
    """
    half = RESOLUTION // 2
    if len(sizes) == 1:
        return [((RESOLUTION - sizes[0]) // 2, (RESOLUTION - sizes[0]) // 2, sizes[0])]
    for cells in itertools.permutations(range(4), len(sizes)):
        boxes = [(c % 2 * half + (half - s) // 2, c // 2 * half + (half - s) // 2, s) for c, s in zip(cells, sizes)]
        if relation is None or relation in relative_position(corners(boxes[1]), corners(boxes[0])):
            return boxes
    raise ValueError(f"no layout of {len(sizes)} objects puts box 1 {relation!r} box 0")


def corners(box):
    x0, y0, size = box
    return (x0, y0, x0 + size, y0 + size)


def render_geneval(row):
    image = np.empty((RESOLUTION, RESOLUTION, 3), np.uint8)
    image[:] = BACKGROUND
    objects = [(req["class"], req.get("color")) for req in row["include"] for _ in range(req["count"])]
    sizes = [{1: 16, 2: 12}.get(len(objects), 10)] * len(objects)  # several: a 16 px quadrant each
    relation = next((req["position"][0] for req in row["include"] if "position" in req), None)
    for (shape, color), box in zip(objects, place_boxes(sizes, relation=relation)):
        image[shape_mask(shape, box)] = COLORS[color or NATURAL[shape]]
    return image


def render_ocr(prompt, inks=INKS):
    """Digits in their colours on the light background, on the patch grid, left-aligned: digit i is always
    in place i, one font bit of space between digits. `inks`: a digit -> RGB map (runs/ocr_probe.py
    draws black glyphs with it)."""
    text = prompt.split('"')[1]
    image = np.empty((RESOLUTION, RESOLUTION, 3), np.uint8)
    image[:] = BACKGROUND
    for i, ch in enumerate(text):
        x, y = GLYPH_SCALE * (1 + 4 * i), 2 * GLYPH_SCALE
        glyph = np.kron(GLYPHS[ch], np.ones((GLYPH_SCALE, GLYPH_SCALE))) > 0
        image[y:y + glyph.shape[0], x:x + glyph.shape[1]][glyph] = inks[ch]
    return image


def tint(color):
    return tuple((c + 255) // 2 for c in color)


def render_pickscore(prompt, rng):
    """One big subject, horizontal 2 px stripes of its colour and its tint, on the asked background."""
    color, shape, background = parse_pickscore(prompt)
    size = int(rng.integers(16, 23))
    x0, y0 = [(RESOLUTION - size) // 2 + int(rng.integers(-3, 4)) for _ in range(2)]
    mask = shape_mask(shape, (x0, y0, size))
    stripes = (np.arange(RESOLUTION)[:, None] // 2 % 2 == 1) & np.ones((1, RESOLUTION), bool)
    image = np.empty((RESOLUTION, RESOLUTION, 3), np.uint8)
    image[:] = background
    image[mask] = COLORS[color]
    image[mask & stripes] = tint(COLORS[color])
    return image


def render(task, prompt, metadata, rng):
    """A ground-truth image (uint8 [H, W, 3]) of a prompt; rng draws the preference subject's size and place."""
    if task == "geneval":
        return render_geneval(metadata)
    if task == "ocr":
        return render_ocr(prompt)
    return render_pickscore(prompt, rng)


# ----------------------------------------------------------------------------- the detector and GenEval

def background_of(image):
    """The background colour: the median of the border pixels."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def distance(image, rgb):
    return np.linalg.norm(image.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1)


def label(mask, diagonal=False):
    """Connected regions of a boolean mask -> (labels, n): 0 off the mask, 1..n numbered in raster order
    of each region's first pixel (scipy.ndimage.label's numbering). 4-connected, or 8-connected with
    diagonal=True. OpenCV comes with the OCR engine (rapidocr); its numbering is made raster order here."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8 if diagonal else 4, ltype=cv2.CV_32S)
    flat = labels.ravel()
    first = np.full(n, flat.size)
    np.minimum.at(first, flat, np.arange(flat.size))  # each label's first pixel in raster order
    renumber = np.zeros(n, np.int64)
    renumber[1 + np.argsort(first[1:])] = np.arange(1, n)
    return renumber[labels], n - 1


def region_sizes(labels, n):
    """Pixel count of regions 1..n."""
    return np.bincount(labels.ravel(), minlength=n + 1)[1:]


def fill_holes(mask):
    """The mask plus every background pixel that the image border cannot reach (4-connected)."""
    outside, n = label(~mask)
    border = np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]))
    return mask | ~np.isin(outside, border[border > 0])


def erode(mask):
    """Pixels whose 4 neighbours are all on the mask (off-image counts as off)."""
    m = np.pad(mask, 1)
    return mask & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def classify_shape(mask):
    """square / bar / tower from a region's bounding box, or None for a ragged region (under half its box)."""
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if min(h, w) < 3 or mask.sum() < 0.5 * h * w:
        return None
    return "bar" if w >= 1.5 * h else "tower" if h >= 1.5 * w else "square"


def detect_objects(image, min_area=8):
    """{shape: [(box (x0, y0, x1, y1), colour), ...]}, largest first (GenEval's "most confident" order).

    Objects are the 4-connected regions that differ from the background, holes filled, whose pixels
    are mostly near one palette colour (the object's colour). Like a learned detector, it tolerates
    noisy pixels and ragged edges; regions of under min_area pixels are specks.
    """
    labels, n = label(distance(image, background_of(image)) > 60)
    palette = np.stack([distance(image, rgb) for rgb in COLORS.values()])
    nearest = np.where(palette.min(0) < 90, palette.argmin(0), len(COLORS))  # len(COLORS): no palette colour
    found = []
    for i in range(1, n + 1):
        votes = np.bincount(nearest[labels == i], minlength=len(COLORS) + 1)[:len(COLORS)]
        mask = fill_holes(labels == i)
        if votes.max() < 0.5 * (labels == i).sum():
            continue  # mostly no one colour: clutter or noise, not an object
        shape = classify_shape(mask) if mask.sum() >= min_area else None
        if shape:
            ys, xs = np.nonzero(mask)
            found.append((mask.sum(), shape, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1),
                          list(COLORS)[votes.argmax()]))
    objects = {}
    for _, shape, box, color in sorted(found, key=lambda f: -f[0]):
        objects.setdefault(shape, []).append((box, color))
    return objects


def relative_position(box_a, box_b, threshold=0.1):
    """GenEval's relations of box A to box B (x0, y0, x1, y1), y pointing down."""
    a, b = np.asarray(box_a, float).reshape(2, 2), np.asarray(box_b, float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    revised = np.maximum(np.abs(offset) - threshold * (a[1] - a[0] + b[1] - b[0]), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {rel for rel, hit in [("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                 ("below", dy > 0.5)] if hit}


def geneval_correct(objects, row):
    """GenEval's strict criterion (its evaluate()): includes AND-ed, excludes OR-ed."""
    groups = []
    correct = True
    for req in row["include"]:
        found = objects.get(req["class"], [])[:req["count"]]
        ok = len(found) >= req["count"]
        if ok and "color" in req:
            ok = [c for _, c in found].count(req["color"]) >= req["count"]
        if ok and "position" in req:
            rel, target = req["position"]
            ok = groups[target] is not None and all(
                rel in relative_position(box, other) for box, _ in found for other, _ in groups[target])
        groups.append(found if ok else None)
        correct = correct and ok
    for req in row.get("exclude", []):
        correct = correct and len(objects.get(req["class"], [])) < req["count"]
    return correct


def geneval_score(objects, row):
    """Flow-GRPO's partial-credit GenEval reward (its evaluate_reward), each term clipped at 0 to stay in [0, 1]."""
    groups, terms = [], []
    for req in row["include"]:
        found = objects.get(req["class"], [])
        n = req["count"]
        terms.append(max(0.0, 1 - abs(n - len(found)) / n))
        matched = len(found) == n
        if not matched and ("color" in req or "position" in req):
            terms.append(0.0)
        elif matched:
            if "color" in req:
                hits = [c for _, c in found].count(req["color"])
                terms.append(max(0.0, 1 - abs(n - hits) / n))
                matched = hits == n
            if "position" in req and matched:
                rel, target = req["position"]
                matched = groups[target] is not None and all(
                    rel in relative_position(box, other) for box, _ in found for other, _ in groups[target])
                terms.append(float(matched))
        groups.append(found if matched else None)
    return sum(terms) / len(terms)


def geneval_details(images, prompts, metadata):
    """Per image: {"reward": partial score, "correct": GenEval's strict bool, "tag": GenEval tag}."""
    out = []
    for image, row in zip(images, metadata):
        objects = detect_objects(image)
        out.append({"reward": geneval_score(objects, row), "correct": geneval_correct(objects, row), "tag": row["tag"]})
    return out


def reward_geneval(images, prompts, metadata):
    """The GenEval reward server's columns: "reward" = Flow-GRPO's training reward (partial credit
    in [0, 1]), "correct" = GenEval's strict criterion, "tag"; needs the metadata rows."""
    if metadata is None or any(not m or "include" not in m for m in metadata):
        raise ValueError("toy:reward_geneval needs GenEval metadata rows (with 'include') for "
                         "every prompt")
    details = geneval_details(images, prompts, metadata)
    return {"reward": np.array([d["reward"] for d in details]),
            "correct": [d["correct"] for d in details], "tag": [d["tag"] for d in details]}


# ----------------------------------------------------------------------------- OCR

def ink(image):
    """How far each pixel is from the background colour, in [0, 1] (1 = any of the font's inks)."""
    return np.clip(distance(image, background_of(image)) / INK_DISTANCE, 0, 1)


def read_glyph(patch):
    """The digit whose 3 x 5 template is nearest to the patch's ink, or '?' when none is near."""
    h, w = patch.shape
    rows = np.minimum(np.linspace(0, h, 6).round().astype(int), h - 1)
    cols = np.minimum(np.linspace(0, w, 4).round().astype(int), w - 1)
    cells = np.array([[patch[rows[i]:max(rows[i + 1], rows[i] + 1), cols[j]:max(cols[j + 1], cols[j] + 1)].mean()
                       for j in range(3)] for i in range(5)])
    errors = {d: np.abs(cells - g).mean() for d, g in GLYPHS.items()}
    best = min(errors, key=errors.get)
    return best if errors[best] < 0.4 else "?"


def read_text(image):
    """The toy's OCR engine: split the ink into glyphs at empty columns, match each against the font."""
    dark = ink(image)
    inked = dark > 0.5
    cols = inked.sum(0) > 0
    text = ""
    x = 0
    while x < len(cols):
        if not cols[x]:
            x += 1
            continue
        end = x
        while end < len(cols) and cols[end]:
            end += 1
        ys = np.nonzero(inked[:, x:end].any(1))[0]
        if inked[:, x:end].sum() >= 4 and len(ys) >= 3:
            y0, y1 = ys.min(), ys.max() + 1
            # glyphs that touch form one run: cut it into as many glyph-shaped cells as fit
            glyph_w, gap = 0.6 * (y1 - y0), 0.2 * (y1 - y0)
            n = max(1, int(round((end - x + gap) / (glyph_w + gap))))
            bounds = np.linspace(x, end + gap, n + 1)
            for i in range(n):
                a, b = int(round(bounds[i])), int(round(bounds[i + 1] - gap))
                text += read_glyph(dark[y0:y1, a:max(b, a + 1)])
        x = end
    return text


def reward_ocr(images, prompts, metadata=None):
    """The real OCR reward (rewards.ocr_score on the text between the first double quotes), toy glyph reader."""
    return np.array([rewards.ocr_score(read_text(image), rewards.ocr_target(p)) for image, p in zip(images, prompts)])


# ----------------------------------------------------------------------------- PickScore and DeQA analogues

def subject_of(image, background):
    """The largest 4-connected region that is not background (the "subject"), as a mask."""
    labels, n = label(distance(image, background) > 60)
    if n == 0:
        return np.zeros(image.shape[:2], bool)
    return labels == 1 + np.argmax(region_sizes(labels, n))


def texture(image, mask):
    """Mean RGB jump between neighbouring pixels inside the mask's interior: stripes and noise both count."""
    interior = erode(mask)
    if interior.sum() == 0:
        return 0.0
    x = image.astype(np.float32)
    dx = np.zeros(mask.shape, np.float32)
    dy = np.zeros(mask.shape, np.float32)
    dx[:, :-1] = np.linalg.norm(x[:, 1:] - x[:, :-1], axis=-1)
    dy[:-1] = np.linalg.norm(x[1:] - x[:-1], axis=-1)
    return float((dx + dy)[interior].mean())


def pickscore_terms(image, prompt):
    color, shape, background = parse_pickscore(prompt)
    subject = subject_of(image, background_of(image))
    names = list(COLORS) * 2
    palette = np.stack([distance(image, rgb) for rgb in list(COLORS.values()) + [tint(c) for c in COLORS.values()]])
    nearest = np.array(names)[palette.argmin(0)]
    return {
        "color": float((nearest[subject] == color).mean()) if subject.any() else 0.0,
        "size": min(1.0, subject.mean() / 0.12),
        "background": max(0.0, 1 - float(np.linalg.norm(background_of(image) - np.asarray(background))) / 150),
        "shape": 1.0 if subject.sum() >= 8 and classify_shape(subject) == shape else 0.5,
        # the stripes of the ground truth jump by |colour - tint| every other row
        "detail": min(1.0, texture(image, subject) / (0.4 * float(np.linalg.norm(np.subtract(
            COLORS[color], tint(COLORS[color])))))),
    }


def reward_pickscore(images, prompts, metadata=None):
    """The toy's human preference, in [0, 1]: the asked colour, a big subject, the asked background and
    shape (half credit for a wrong one), and detail; a product, so every part matters.

    "detail" is texture energy inside the subject: the stripes of the ground truth earn it, and so
    does pixel noise, which DeQA and the detectors punish.
    """
    return np.array([np.prod(list(pickscore_terms(image, p).values())) for image, p in zip(images, prompts)])


def isolation(image):
    """Per pixel, the RGB distance to its most similar 8-neighbour: 0 inside any 2 px wide stroke, large for noise."""
    x = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    shifts = [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    return np.min([np.linalg.norm(x[dy:dy + h, dx:dx + w] - x[1:-1, 1:-1], axis=-1) for dy, dx in shifts], axis=0)


def deqa_terms(image):
    far = distance(image, background_of(image))
    foreground = far > 60
    fraction = foreground.mean()
    labels, n = label(foreground, diagonal=True)
    specks = int((region_sizes(labels, n) <= 5).sum())
    return {
        "content": min(1.0, fraction / 0.015) * min(1.0, max(0.0, (0.85 - fraction) / 0.25)),
        "contrast": min(1.0, float(np.percentile(far[foreground], 90)) / 150) if foreground.any() else 0.0,
        "clean": min(1.0, max(0.0, 1 - (float(isolation(image).mean()) - 6) / 20)),
        "tidy": max(0.0, 1 - 0.1 * specks),
    }


def reward_deqa(images, prompts=None, metadata=None):
    """Task-agnostic quality on DeQA's 1-5 scale: 1 + 4 x content x contrast x clean x tidy.

    content: a subject covering 1.5-60 % of the image (blank or all-subject images score 1);
    contrast: the subject stands out from the background (not washed out);
    clean: no pixel noise (a pixel unlike all its neighbours is noise; strokes are >= 2 px wide);
    tidy: no specks (foreground blobs of <= 5 px).
    """
    return np.array([1 + 4 * np.prod(list(deqa_terms(image).values())) for image in images])


TOY_REWARDS = {"geneval": lambda *batch: reward_geneval(*batch)["reward"], "ocr": reward_ocr,
               "pickscore": reward_pickscore}  # each task's reward as an array [B]
# what evaluate.py and the held-out evaluation score each column with (flow_opd.json), and the
# factor from a reward to its column's scale: the toy PickScore is in [0, 1], like PickScore / 26
METRICS = {"geneval": "toy:reward_geneval", "ocr": "toy:reward_ocr",
           "pickscore": "toy:reward_pickscore", "deqa": "toy:reward_deqa"}
METRIC_SCALES = {"toy:reward_pickscore": 26.0}


# ----------------------------------------------------------------------------- the pipeline

def train_tokenizer(folder, max_length):
    """A CLIPTokenizer whose BPE was trained on the toy vocabulary, so that every toy word is one token.

    CLIP's pre-tokenizer splits digits apart, so '"4071"' becomes '"', 4, 0, 7, 1, '"'.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(vocabulary(), trainers.BpeTrainer(
        vocab_size=10_000, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        show_progress=False))
    os.makedirs(folder, exist_ok=True)
    bpe.model.save(folder)
    # the BPE trainer breaks ties in hash order, so its token ids differ from process to process;
    # renumber them canonically (specials, the toy words, then the other pieces, each sorted), so that
    # the same --seed builds the same text encoders. The merges stay as trained: each still ends in a
    # whole toy word (tests/test_toy.py checks every one).
    path = os.path.join(folder, "vocab.json")
    with open(path) as f:
        tokens = json.load(f)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    words = sorted(w + "</w>" for w in vocabulary() if w + "</w>" in tokens)
    order = specials + words + sorted(set(tokens) - set(specials) - set(words))
    with open(path, "w") as f:
        json.dump({token: i for i, token in enumerate(order)}, f, ensure_ascii=False)
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=max_length)


def identity_vae(channels=3, big=1000.0):
    """An AutoencoderKL that maps pixels in [-1, 1] to the same latents and back, exactly (to ~1e-7).

    The resnets are identities (zero last conv). The final GroupNorm + SiLU is made linear: each group
    holds (x, -x, +big, -big), so its mean is 0 and its variance ~big^2 / 2 barely depends on x, and
    silu(y) - silu(-y) = y undoes the activation in the last conv.
    """
    from diffusers import AutoencoderKL
    width = 4 * channels
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(width,),
                        layers_per_block=1, norm_num_groups=channels, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), mid_block_add_attention=False,
                        scaling_factor=1.0, shift_factor=0.0)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for part in (vae.encoder, vae.decoder):
            for c in range(channels):
                part.conv_in.weight[4 * c, c, 1, 1] = 1.0
                part.conv_in.weight[4 * c + 1, c, 1, 1] = -1.0
                part.conv_in.bias[4 * c + 2], part.conv_in.bias[4 * c + 3] = big, -big
                part.conv_norm_out.weight[4 * c:4 * c + 2] = (big ** 2 / 2) ** 0.5
                part.conv_norm_out.weight[4 * c + 2:4 * c + 4] = 0.0
                part.conv_out.weight[c, 4 * c, 1, 1] = 1.0
                part.conv_out.weight[c, 4 * c + 1, 1, 1] = -1.0
        vae.encoder.conv_out.bias[channels:] = -30.0  # log variance: the posterior is a point
        vae.quant_conv.weight.copy_(torch.eye(2 * channels)[:, :, None, None])
        vae.post_quant_conv.weight.copy_(torch.eye(channels)[:, :, None, None])
    return vae


def build_pipeline(args):
    """A randomly initialised tiny StableDiffusion3Pipeline (no T5) with the identity VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(args.seed)
    tokenizer = train_tokenizer(os.path.join(args.out, "tokenizer_bpe"), args.max_tokens)
    encoders = []
    for _ in range(2):  # SD3's CLIP-L and CLIP-G, both tiny, random and frozen. At CLIP's initial scale
        # a digit's hidden state differs from another digit's by 0.4 of its norm (the random layers wash
        # the word out) and the pretrained base drew every number alike; 10x larger embeddings: 0.9.
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=32, max_position_embeddings=args.max_tokens,
            bos_token_id=0, eos_token_id=1, pad_token_id=1, initializer_factor=10.0)))
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION, patch_size=args.patch_size, in_channels=3, out_channels=3, num_layers=args.layers,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=64,
        caption_projection_dim=args.heads * args.head_dim, pooled_projection_dim=64,
        pos_embed_max_size=RESOLUTION // args.patch_size)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=identity_vae(), text_encoder=encoders[0], tokenizer=tokenizer,
                                    text_encoder_2=encoders[1], tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    return pipe


@torch.no_grad()
def encode_all(pipe, prompts, batch_size=256):
    """(prompt_embeds, pooled) of many prompts, computed once: the text encoders are frozen."""
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        e, _, p, _ = pipe.encode_prompt(prompts[i:i + batch_size], prompt_2=None, prompt_3=None,
                                        do_classifier_free_guidance=False, max_sequence_length=1)
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


@torch.no_grad()
def to_latents(pipe, images):
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = pipe.vae.config
    return (pipe.vae.encode(pixels).latent_dist.mean - vae.shift_factor) * vae.scaling_factor


def pretrain(pipe, prompts, args):
    """Flow matching (FM) on fresh ground-truth renders of the train prompts (common.Prompt list).

    t is logit-normal without the sampler's shift: the shift would leave the last, low-noise steps
    almost untrained, and the samples noisy.
    """
    from tqdm import tqdm
    embeds, pooled = encode_all(pipe, [p.text for p in prompts] + [""])  # the last row: "" for (CFG)
    transformer = pipe.transformer
    transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(200, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + np.cos(np.pi * s / args.steps)))  # cosine decay: a sharper model at the end of a fixed budget
    rng = np.random.default_rng([args.seed, 0])
    generator = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.steps), desc="pretrain", mininterval=5)
    by_task = {task: [i for i, p in enumerate(prompts) if p.task == task] for task in TASKS}
    for step in bar:
        tasks = rng.choice(TASKS, args.batch_size, p=[TASK_MIX[t] for t in TASKS])
        chosen = np.array([rng.choice(by_task[t]) for t in tasks])
        x0 = to_latents(pipe, [render(prompts[i].task, prompts[i].text, prompts[i].metadata, rng) for i in chosen])
        rows = torch.from_numpy(np.where(rng.random(len(chosen)) < args.cfg_dropout, len(prompts), chosen))
        noise = torch.randn(x0.shape, generator=generator)
        t = common.sample_train_t(len(x0), shift=1.0, generator=generator)
        v = common.velocity(transformer, common.add_noise(x0, noise, t), t, embeds[rows], pooled[rows])
        loss = common.fm_loss(v, x0, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    transformer.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- data root (Flow-GRPO's layout)

# The out-of-distribution split: combinations that no post-training split contains. The base saw
# them in pretraining (as SD3.5-M's web-scale pretraining saw everything); the teachers, GRPO and
# OPD never train on them. Each is a pair of things every split does contain on their own.
HELD_OUT = {
    "color_shape": [("yellow", "square"), ("purple", "square"), ("orange", "bar"),  # each colour
                    ("green", "bar"), ("red", "tower"), ("blue", "tower")],  # once: colors, PickScore
    "count_shape": [(3, "square"), (4, "bar"), (2, "tower")],  # counting: "four bars", ...
    "two_object": [("bar", "square")],  # "a bar and a square" ("a square and a bar" is seen)
    "position": [("square", "above", "bar"), ("tower", "left of", "square"),  # "a square above a bar"
                 ("bar", "below", "tower"), ("square", "right of", "tower"),
                 ("tower", "above", "bar"), ("bar", "left of", "square")],
    "digits": ["07", "13", "29", "31", "46", "58", "64", "75", "82", "90"],  # two-digit OCR texts
}
# color_attr (two coloured objects) is left out of the OOD prompts: every model scores 0 on it
OOD_TAGS = ["two_object", "counting", "colors", "position"]


def held_out(task, prompt, row=None):
    """The held-out combinations (HELD_OUT) a prompt contains, as strings; [] = in distribution."""
    found = []
    if task == "geneval":
        objects, tag = row["include"], row["tag"]
        pairs = [(o["color"], o["class"]) for o in objects if "color" in o]
        found += [f"{c} {s}" for c, s in pairs if (c, s) in HELD_OUT["color_shape"]]
        if tag == "counting" and (objects[0]["count"], objects[0]["class"]) in HELD_OUT["count_shape"]:
            found.append(f"{NUMBERS[objects[0]['count']]} {objects[0]['class']}s")
        if tag == "two_object" and (objects[0]["class"], objects[1]["class"]) in HELD_OUT["two_object"]:
            found.append(f"{objects[0]['class']} and {objects[1]['class']}")
        if tag == "position":
            triple = (objects[1]["class"], objects[1]["position"][0], objects[0]["class"])
            if triple in HELD_OUT["position"]:
                found.append(" ".join(triple))
    elif task == "ocr":
        text = rewards.ocr_target(prompt)
        found += [text] if text in HELD_OUT["digits"] else []
    elif task == "pickscore":
        color, shape, _ = parse_pickscore(prompt)
        found += [f"{color} {shape}"] if (color, shape) in HELD_OUT["color_shape"] else []
    return found


def draw(task, rng, tag=None, ood=None):
    """(prompt, metadata row or None); ood=False: no held-out combination, True: at least one,
    None: either (the pretraining draw). By rejection: every combination is a few draws away."""
    while True:
        prompt, row = sample_prompt(task, rng, tag)
        if ood is None or bool(held_out(task, prompt, row)) == ood:
            return prompt, row


def write_data(root, train_size, test_size, seed, geneval_test_size=None, ood_size=128,
               geneval_ood_size=192):
    """Flow-GRPO's layout: <root>/geneval/<split>_metadata.jsonl, <root>/{ocr,pickscore}/<split>.txt.

    Splits: pretrain (the base's pretraining prompts, every combination), train and test (no
    held-out combination), ood (only held-out combinations; GenEval's OOD_TAGS in turn) and
    <root>/ood.json, what was held out. The prompt spaces are small (GenEval 240 prompts), so the
    splits share prompts; each split is its own draw, GenEval's tags in turn. GenEval's test split
    has geneval_test_size prompts (default test_size): its score is binary per image and needs more
    prompts for the same error.
    """
    splits = [("pretrain", 1, train_size, train_size, None, TAGS),
              ("train", 3, train_size, train_size, False, TAGS),
              ("test", 2, test_size, geneval_test_size or test_size, False, TAGS),
              ("ood", 4, ood_size, geneval_ood_size, True, OOD_TAGS)]
    for task in TASKS:
        os.makedirs(os.path.join(root, task), exist_ok=True)
    counts = {}
    for split, stream, size, geneval_size, ood, tags in splits:
        rng = np.random.default_rng([seed, stream])
        with open(os.path.join(root, "geneval", f"{split}_metadata.jsonl"), "w") as f:
            for i in range(geneval_size):
                f.write(json.dumps(draw("geneval", rng, tags[i % len(tags)], ood)[1]) + "\n")
        for task in ("ocr", "pickscore"):
            with open(os.path.join(root, task, f"{split}.txt"), "w") as f:
                f.writelines(draw(task, rng, ood=ood)[0] + "\n" for _ in range(size))
        counts[split] = {"geneval": geneval_size, "ocr": size, "pickscore": size}
    with open(os.path.join(root, "ood.json"), "w") as f:
        json.dump({"held_out": HELD_OUT, "ood_geneval_tags": OOD_TAGS, "prompts": counts,
                   "note": "no train or test prompt contains a held-out combination; every ood "
                           "prompt contains one; the base's pretraining (split pretrain) saw them"},
                  f, indent=1)


# ----------------------------------------------------------------------------- measuring the base

def to_uint8(images):
    """Float [B, H, W, 3] in [0, 1] -> uint8, rounded as Flow-GRPO does."""
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def sample(pipe, prompts, steps, seed, guidance_scale=4.5, batch_size=32):
    """Images (uint8 [B, H, W, 3]) from the stock StableDiffusion3Pipeline (ODE sampler), one seed per image."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out.append(pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance_scale, height=RESOLUTION,
                        width=RESOLUTION, max_sequence_length=1, generator=generators, output_type="np").images)
    return to_uint8(np.concatenate(out))


def score(task, images, prompts, metadata):
    """Task reward and DeQA of a batch: {"reward", "deqa"(, "correct", "per_tag" for GenEval)}."""
    out = {"reward": float(np.mean(TOY_REWARDS[task](images, prompts, metadata))),
           "deqa": float(np.mean(reward_deqa(images)))}
    if task == "geneval":
        details = geneval_details(images, prompts, metadata)
        out["correct"] = float(np.mean([d["correct"] for d in details]))
        out["per_tag"] = {tag: float(np.mean([d["correct"] for d in details if d["tag"] == tag]))
                          for tag in TAGS if any(d["tag"] == tag for d in details)}
    return out


def group_spread(pipe, task, prompts, metadata, group_size, steps, seed, noise_level=0.7, sde_steps=None):
    """GRPO's view of the base: rewards of `group_size` SDE samples per prompt -> their spread, the
    mean of each group's best (where GRPO can pull the policy), and the samples' DeQA and its spread.
    sde_steps: noise on the first this many steps only (common.rollout; None: every step)."""
    texts = [p for p in prompts for _ in range(group_size)]
    rows = [m for m in metadata for _ in range(group_size)] if metadata else None
    cond, uncond = common.encode_prompts(pipe, texts, max_sequence_length=1)
    generators = common.sample_generators(seed, 0, range(len(texts)))
    latents = common.initial_latents(pipe, RESOLUTION, generators, "cpu")
    xs, _ = common.rollout(pipe.transformer, cond, uncond, latents, common.timesteps(steps), 4.5, noise_level,
                           generator=generators, sde_steps=sde_steps)
    images = to_uint8(common.decode(pipe, xs[:, -1]).permute(0, 2, 3, 1).numpy())
    rewards = TOY_REWARDS[task](images, texts, rows).reshape(len(prompts), group_size)
    deqa = reward_deqa(images).reshape(len(prompts), group_size)
    return {"prompts": len(prompts), "group_size": group_size, "mean": float(rewards.mean()),
            "group_std": float(rewards.std(1).mean()), "best_of_group": float(rewards.max(1).mean()),
            "groups_with_spread": float((rewards.std(1) > 1e-6).mean()),
            "deqa": float(deqa.mean()), "deqa_group_std": float(deqa.std(1).mean())}


def measure(pipe, data_root, args):
    """Base scores on the first --eval-prompts test prompts of each task, group spread, sampling speed."""
    tests = {task: common.load_prompts(data_root, [task], "test") for task in TASKS}
    result = {}
    for task in TASKS:
        chosen = tests[task][:args.eval_prompts]
        prompts = [p.text for p in chosen]
        metadata = [p.metadata for p in chosen] if task == "geneval" else None
        result[task] = {f"steps_{steps}": score(task, sample(pipe, prompts, steps, args.seed), prompts, metadata)
                        for steps in args.eval_steps}
        k = args.group_prompts
        result[task]["group"] = group_spread(pipe, task, prompts[:k], metadata[:k] if metadata else None,
                                             args.group_size, 10, args.seed)
    start = time.perf_counter()
    sample(pipe, [p.text for p in tests["geneval"][:16]], 10, args.seed)
    result["seconds_16_images_10_steps"] = time.perf_counter() - start
    return result


def save_samples(pipe, data_root, path, per_task=8, steps=40, seed=0):
    """A PNG grid, one row per task, of base samples (4x nearest upscaling so 32 px stays visible)."""
    rows = []
    for task in TASKS:
        prompts = [p.text for p in common.load_prompts(data_root, [task], "test")[:per_task]]
        rows.append(sample(pipe, prompts, steps, seed))
    images = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 255
    common.save_grid(images.repeat_interleave(4, 2).repeat_interleave(4, 3), path, per_task)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/toy", help="world folder: <out>/base, <out>/data, <out>/world.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a barely trained world in seconds, for tests")
    p.add_argument("--max-steps", dest="steps", type=int, default=None,
                   help="pretraining optimizer steps (default 4500, --quick 150)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="share of empty prompts, for (CFG)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16, help="CLIP context length (the longest toy prompt is 13)")
    p.add_argument("--train-size", type=int, default=2000, help="train prompts per task")
    p.add_argument("--test-size", type=int, default=256,
                   help="test prompts of ocr and pickscore (OCR accuracy's standard error: 0.017 at 256)")
    p.add_argument("--geneval-test-size", type=int, default=512,
                   help="GenEval test prompts (binary per image: standard error <= 0.02 needs ~450 at the base's 0.4)")
    p.add_argument("--ood-size", type=int, default=128,
                   help="out-of-distribution prompts of ocr and pickscore (held-out combinations)")
    p.add_argument("--geneval-ood-size", type=int, default=192,
                   help="out-of-distribution GenEval prompts (48 per tag of toy.OOD_TAGS)")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="test prompts per task scored here (default 96, --quick 8)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=None, help="sampling steps to score (default 10 40)")
    p.add_argument("--group-prompts", type=int, default=None, help="prompts per task for the group spread (default 16)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: shared 2-core machines)")
    args = p.parse_args(argv)
    quick = args.quick
    args.steps = args.steps if args.steps is not None else (150 if quick else 4500)
    args.eval_prompts = args.eval_prompts if args.eval_prompts is not None else (8 if quick else 96)
    args.eval_steps = args.eval_steps or ([10] if quick else [10, 40])
    args.group_prompts = args.group_prompts if args.group_prompts is not None else (2 if quick else 16)
    return args


WORLD_KEYS = ["seed", "steps", "batch_size", "lr", "cfg_dropout", "layers", "heads", "head_dim", "patch_size",
              "max_tokens", "train_size", "test_size", "geneval_test_size", "ood_size", "geneval_ood_size"]


def main(args):
    torch.set_num_threads(args.threads)
    config = {k: getattr(args, k) for k in WORLD_KEYS}
    with open(__file__, "rb") as f:
        config["toy_py_sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]  # an edited world is rebuilt
    base, data = os.path.join(args.out, "base"), os.path.join(args.out, "data")
    world_file = os.path.join(args.out, "world.json")
    if os.path.isfile(world_file):
        with open(world_file) as f:
            world = json.load(f)
        if world["config"] == config and os.path.isfile(os.path.join(base, "model_index.json")):
            print(f"toy world in {args.out} is up to date (built in {world['build_seconds']:.0f} s)")
            print_table(world)
            return world
    for folder in (base, data, os.path.join(args.out, "tokenizer_bpe")):
        shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    write_data(data, args.train_size, args.test_size, args.seed, args.geneval_test_size,
               args.ood_size, args.geneval_ood_size)
    pipe = build_pipeline(args)
    prompts = common.load_prompts(data, TASKS, "pretrain")
    longest = max(len(pipe.tokenizer(p.text).input_ids) for p in prompts)
    if longest > args.max_tokens:
        raise ValueError(f"a toy prompt has {longest} tokens > --max-tokens {args.max_tokens}")
    pretrain(pipe, prompts, args)
    pipe.save_pretrained(base)
    with open(os.path.join(base, "flow_opd.json"), "w") as f:
        json.dump({"max_sequence_length": 1, "resolution": RESOLUTION, "metrics": METRICS,
                   "metric_scales": METRIC_SCALES}, f)
    shutil.rmtree(os.path.join(args.out, "tokenizer_bpe"))
    build_seconds = time.perf_counter() - start
    pipe = common.load_pipeline(base)  # measure what the stages will load
    world = {"config": config, "build_seconds": build_seconds, "base": measure(pipe, data, args)}
    if not args.quick:
        save_samples(pipe, data, os.path.join(args.out, "samples.png"), seed=args.seed)
    world["total_seconds"] = time.perf_counter() - start
    with open(world_file, "w") as f:
        json.dump(world, f, indent=1)  # written last: its presence marks a complete world
    print_table(world)
    return world


def print_table(world):
    base = world["base"]
    steps = sorted({k for t in TASKS for k in base[t] if k.startswith("steps_")}, key=lambda k: int(k[6:]))
    header = [f"{t} {s.replace('_', ' ')}" for s in steps for t in TASKS]
    print("| base model | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for name, key in [("task reward", "reward"), ("GenEval correct", "correct"), ("DeQA (1-5)", "deqa")]:
        cells = [f"{base[t][s][key]:.3f}" if key in base[t][s] else "" for s in steps for t in TASKS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for s in steps:
        print(f"GenEval correct per tag, {s.replace('_', ' ')}:",
              {k: round(v, 3) for k, v in base["geneval"][s]["per_tag"].items()})
    for t in TASKS:
        g = base[t]["group"]
        print(f"{t}: {g['prompts']} prompts x {g['group_size']} SDE samples (10 steps): reward {g['mean']:.3f}, "
              f"within-group std {g['group_std']:.3f}, groups with spread {g['groups_with_spread']:.2f}, "
              f"best of group {g['best_of_group']:.3f}")
    print(f"16 images x 10 steps with CFG: {base['seconds_16_images_10_steps']:.2f} s; "
          f"build + pretrain {world['build_seconds']:.0f} s")


if __name__ == "__main__":
    common.quiet_libraries()
    main(parse_args())
