"""Reward functions of Flow-GRPO / Flow-OPD, one small function each, selected by name.

    fn = rewards.load("ocr")                          # or "deqa:0.4,pickscore:0.6" (weighted sum)
    fn = rewards.load("mymodule:my_reward")           # your function, in ./mymodule.py
    fn = rewards.load("url:http://host:8000")         # any server speaking the JSON protocol below
    r = fn(images, prompts, metadata=None)            # np.ndarray [B] of float, the training reward
    rows = fn.details(images, prompts, metadata)      # list of B dicts, for evaluate.py

images: a list of PIL images, a uint8 array/tensor [B, H, W, 3], or a float tensor [B, 3, H, W]
in [0, 1] (diffusers' output_type="pt"). `load` converts them once with `as_uint8`, and every
reward function in REWARDS is called as f(images_uint8 [B, H, W, 3], prompts, metadata).
A reward function returns either an array of B rewards or a dict of per-image columns with at
least "reward"; `fn.columns(images, prompts, metadata)` returns those columns for the batch and
`fn.details` turns them into one dict per image:

    name        reward (what fn returns)               other keys in fn.details rows
    ocr         1 - min(lev, len) / len, in [0, 1]     text (recognised), target
    pickscore   PickScore logit / 26                   raw (the logit, ~21-23 on SD3.5-M)
    geneval     partial-credit score in [0, 1]         correct (bool, GenEval's criterion), tag
    deqa        DeQA-Score / 5, in [0, 1]              raw (DeQA-Score, 1-5)
    jpeg        -(JPEG size in kB at quality 95) / 500 kb
    mod:fn      mod.fn(images, prompts, metadata)      the other columns fn returns
    url:URL     the server's "scores"                  the server's other per-image lists
    a:wa,b:wb   wa * a + wb * b                        a, b (component rewards), a.<key>, b.<key>

A spec is one REF or a blend of REF:WEIGHT parts joined by commas (each split at its last colon).
REF is a registered name (the table above, or `register(name, loader)`), `module:function` (the
module imported from the working directory or sys.path; the toy world's rewards are
`toy:reward_geneval`, `toy:reward_ocr`, `toy:reward_pickscore`, `toy:reward_deqa`), or
`url:http://host:port[/path]`. A single `name:weight` weights a registered name; any other single
part is a REF as a whole, so `url:http://h:8000` and `mymod:fn` need no weight.

Bad input raises instead of scoring: an OCR prompt with no "quoted" text, an unknown name, a
malformed blend, a module or function that is not there, a `url:` server that cannot be reached
(when loaded), a reward server that is down or answers nonsense (RewardServerError).

Configuration (keyword arguments of `load`, else environment variables):
    pickscore   processor=, model= (PICKSCORE_PROCESSOR, PICKSCORE_MODEL), device=
    geneval     url= (GENEVAL_URL), batch_size=16, timeout=120, attempts=3, backoff=1
    deqa        url= (DEQA_URL), same options
A keyword goes to each component of a blend that accepts it.

Reward server protocol (geneval, deqa, url:; `reward_server.py` serves any reward of this module):
POST <url>, JSON body {"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [dict, ...]},
answer 200 with JSON {"scores": [float, ...], ...}: one score per image; any other list of the
same length is a per-image column (GenEval: "correct": [bool], "tags": [str]). JSON only: nothing
from the network is ever unpickled. `remote(url)` is the client for any such server.
"""
import base64
import functools
import http.client
import importlib
import inspect
import io
import json
import math
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image


def as_uint8(images):
    """Images in any of the accepted forms -> np.uint8 [B, H, W, 3]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if images and isinstance(images[0], Image.Image):
            return np.stack([np.asarray(im.convert("RGB")) for im in images])
        images = np.stack([np.asarray(im) for im in images])
    if hasattr(images, "detach"):  # torch tensor, without importing torch here
        images = images.detach().cpu()
        images = images.float().numpy() if images.is_floating_point() else images.numpy()
    images = np.asarray(images)
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(f"expected images [B, H, W, 3] or [B, 3, H, W], got shape {images.shape}")
    if images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if np.issubdtype(images.dtype, np.floating):
        if images.size and images.min() < -0.01:
            # [-1, 1] images would be silently clipped into wrong rewards
            raise ValueError("float images must be in [0, 1] (diffusers output_type='pt')")
        return (images * 255).round().clip(0, 255).astype(np.uint8)  # as Flow-GRPO rounds
    raise ValueError(f"images must be uint8 or float, got {images.dtype}")


def paper_average(geneval, ocr, pickscore, deqa):
    """The paper's table "Average": mean(GenEval, OCR, DeQA / 5, PickScore / 26)."""
    return (geneval + ocr + deqa / 5 + pickscore / 26) / 4


def jpeg(images, prompts, metadata):
    """Flow-GRPO's jpeg_compressibility: smaller files are better."""
    kb = np.array([_jpeg_bytes(im) / 1000 for im in images])
    return {"reward": -kb / 500, "kb": kb}


def _jpeg_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.tell()


def ocr_target(prompt):
    """The text to render: between the first pair of double quotes, lowercased, no spaces."""
    match = re.search(r'"([^"]*)"', prompt)
    target = _normalise(match.group(1)) if match else ""
    if not target:
        # a silent 0 would hide a prompt set routed to the wrong reward
        raise ValueError(f'OCR reward needs the text to render in double quotes, got prompt {prompt!r}')
    return target


def _normalise(text):
    return text.lower().replace(" ", "")


def levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions), one row at a time."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ocr_score(recognised, target):
    """Flow-GRPO's OCR reward on normalised strings: 1 if the target occurs, else 1 - lev / len."""
    if target in recognised:
        return 1.0
    return 1.0 - min(levenshtein(recognised, target), len(target)) / len(target)


def reading_order(result):
    """Join RapidOCR's boxes as a person reads: lines top to bottom, boxes left to right.

    A box joins the current line when its vertical centre lies inside the line's first box, so
    slightly tilted words stay on one line. Reading order (rather than the best over all line
    orders) rewards the layout the prompt implies and costs one edit distance per image."""
    boxes = sorted(result or [], key=lambda r: min(p[1] for p in r[0]))
    lines = []
    for box in boxes:
        ys = [p[1] for p in box[0]]
        centre = (min(ys) + max(ys)) / 2
        if lines and lines[-1][0] <= centre <= lines[-1][1]:
            lines[-1][2].append(box)
        else:
            lines.append((min(ys), max(ys), [box]))
    return "".join(r[1] for _, _, line in lines for r in sorted(line, key=lambda r: min(p[0] for p in r[0])))


@functools.lru_cache(maxsize=None)
def _ocr_engine():
    from rapidocr_onnxruntime import RapidOCR  # ships its ONNX models in the wheel: offline

    return RapidOCR()


def ocr(images, prompts, metadata):
    targets = [ocr_target(p) for p in prompts]  # before the slow part: bad prompts fail fast
    engine = _ocr_engine()
    texts = []
    for image in images:
        # RapidOCR reads arrays as OpenCV's BGR; no angle classifier, as Flow-GRPO (use_angle_cls=False)
        result, _ = engine(np.ascontiguousarray(image[..., ::-1]), use_cls=False)
        texts.append(_normalise(reading_order(result)))
    return {"reward": np.array([ocr_score(t, g) for t, g in zip(texts, targets)]), "text": texts, "target": targets}


def pickscore(processor=None, model=None, device=None, batch_size=32):
    """PickScore = logit_scale.exp() * cos(image, text) of PickScore_v1; the reward is that / 26."""
    processor = processor or os.environ.get("PICKSCORE_PROCESSOR", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    model = model or os.environ.get("PICKSCORE_MODEL", "yuvalkirstain/PickScore_v1")
    processor, model = _pickscore_model(processor, model, device)

    def logits(images, prompts):
        import torch

        pixels = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
        text = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_emb = _embedding(model.get_image_features(pixel_values=pixels.to(model.device)))
            text_emb = _embedding(model.get_text_features(**{k: v.to(model.device) for k, v in text.items()}))
            cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
            return (model.logit_scale.exp().float() * cos).cpu().double().numpy()

    def score(images, prompts, metadata):
        # chunks bound activation memory when a trainer scores a whole epoch of rollouts at once
        raw = np.concatenate([logits(images[i:i + batch_size], prompts[i:i + batch_size])
                              for i in range(0, len(images), batch_size)])
        return {"reward": raw / 26, "raw": raw}

    return score


@functools.lru_cache(maxsize=None)
def _pickscore_model(processor, model, device):
    # cached: a trainer and its evaluation share one copy of the 1B-parameter model
    import torch
    from transformers import AutoModel, AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return AutoProcessor.from_pretrained(processor), AutoModel.from_pretrained(model).eval().to(device)


def _embedding(output):
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding
    return output.pooler_output if hasattr(output, "pooler_output") else output


class RewardServerError(ConnectionError):
    """A reward server is down or answers nonsense: a fault of the run, not of its command line."""


def encode_png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # lossless, unlike Flow-GRPO's JPEG
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text)), formats=["PNG"]).convert("RGB"))


# per-image columns travel under these names in the protocol; all others keep their names
WIRE_NAMES = {"reward": "scores", "tag": "tags"}
COLUMN_NAMES = {v: k for k, v in WIRE_NAMES.items()}


def remote(url, batch_size=16, timeout=120.0, attempts=3, backoff=1.0, score_range=None, required=()):
    """Reward function (images_uint8, prompts, metadata) -> columns, scored by the server at url.

    Batches of batch_size images; connection errors, timeouts (seconds per socket operation) and
    HTTP 5xx are retried, `attempts` tries in all, waiting backoff * 2^k seconds in between; an
    answer is checked before it becomes a reward (count, finite numbers in score_range, required
    columns); an HTTP 4xx or a nonsense answer is not retried: it would not change."""
    # direct connections: reward servers sit next to the trainer, not behind http_proxy
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(body):
        error = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                with opener.open(request, timeout=timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
                if 400 <= e.code < 500:  # our request is wrong: retrying cannot help
                    break
            except (OSError, http.client.HTTPException) as e:  # refused, unreachable, timed out, cut off
                error = repr(getattr(e, "reason", e))
        raise RewardServerError(f"reward server {url} failed after {attempt + 1} attempt(s): {error}")

    def score(images, prompts, metadata):
        metadata = metadata or [{} for _ in prompts]
        columns = {"reward": []}
        for i in range(0, len(images), batch_size):
            n = len(images[i:i + batch_size])
            body = json.dumps({"images": [encode_png(im) for im in images[i:i + batch_size]],
                               "prompts": list(prompts[i:i + batch_size]),
                               "metadata": list(metadata[i:i + batch_size])}).encode()
            for name, values in _check_response(post(body), n, url, score_range, required).items():
                columns.setdefault(name, []).extend(values)
        columns["reward"] = np.array(columns["reward"], dtype=np.float64)
        return columns

    return score


def _check_response(raw, n, url, score_range, required):
    """The server's answer -> per-image columns, or RewardServerError saying what is wrong."""
    def fail(why):
        raise RewardServerError(f"reward server {url} sent a bad response: {why}")

    try:
        answer = json.loads(raw)
    except ValueError:
        fail(f"not JSON: {raw[:200]!r}")
    if not isinstance(answer, dict) or not isinstance(answer.get("scores"), list):
        fail(f'expected a JSON object with a "scores" list, got {str(answer)[:200]}')
    columns = {COLUMN_NAMES.get(k, k): v for k, v in answer.items() if isinstance(v, list)}
    for name, values in columns.items():
        if len(values) != n:
            fail(f'"{WIRE_NAMES.get(name, name)}" has {len(values)} entries for {n} images')
    for s in columns["reward"]:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            fail(f"score {s!r} is not a finite number")
        if score_range and not score_range[0] <= s <= score_range[1]:
            fail(f"score {s} outside {list(score_range)}")
    for name in required:
        if WIRE_NAMES.get(name, name) not in answer:
            fail(f'missing "{WIRE_NAMES.get(name, name)}"')
    if "correct" in columns and not all(isinstance(c, bool) for c in columns["correct"]):
        fail('"correct" must be a list of true/false')
    return columns


def _server_url(url, variable):
    url = url or os.environ.get(variable)
    if not url:
        raise ValueError(f"no reward server: set {variable}=http://host:port or pass url=")
    return url


def geneval(url=None, batch_size=16, timeout=120.0, attempts=3, backoff=1.0):
    """GenEval (object detector + CLIP colour check) behind a reward server: partial-credit
    score in [0, 1] for training, plus GenEval's own correct/tag per image for evaluation."""
    return remote(_server_url(url, "GENEVAL_URL"), batch_size, timeout, attempts, backoff,
                  score_range=(0, 1), required=("correct", "tag"))


def deqa(url=None, batch_size=16, timeout=120.0, attempts=3, backoff=1.0):
    """DeQA-Score behind a reward server. The server sends DeQA / 5 (Flow-GRPO's server does);
    the range check catches one that sends the raw 1-5 score."""
    score = remote(_server_url(url, "DEQA_URL"), batch_size, timeout, attempts, backoff, score_range=(0, 1))

    def with_raw(images, prompts, metadata):
        columns = score(images, prompts, metadata)
        return {**columns, "raw": columns["reward"] * 5}

    return with_raw


# name -> loader(**options) -> reward function f(images_uint8, prompts, metadata); see register()
REWARDS = {
    "ocr": lambda: ocr,
    "pickscore": pickscore,
    "geneval": geneval,
    "deqa": deqa,
    "jpeg": lambda: jpeg,
}
SPEC_FORMS = ("expected a reward name, module:function, url:http://host:port, or a blend "
              "'REF:weight,REF:weight' (e.g. 'deqa:0.4,pickscore:0.6')")


def register(name, loader):
    """Make `name` usable in reward specs: loader(**options) -> f(images_uint8 [B, H, W, 3],
    prompts, metadata) returning B rewards or a dict of per-image columns with at least "reward"."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", name) or name == "url":
        raise ValueError(f"reward name {name!r}: use letters, digits, '_', '.' or '-' "
                         "(no ':', ',' or '=')")
    if name in REWARDS:
        raise ValueError(f"reward {name!r} is already registered")
    if not callable(loader):
        raise TypeError(f"reward {name!r}: the loader must be callable, "
                        f"got {type(loader).__name__}")
    REWARDS[name] = loader


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def reward_loader(ref):
    """One REF of a spec -> its loader: a registered name, module:function or url:URL."""
    if ref in REWARDS:
        return REWARDS[ref]
    if ref.startswith("url:"):
        url = ref[len("url:"):]
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"reward {ref!r}: expected url:http://host:port[/path]")
        return functools.partial(url_reward, url)
    module, sep, function = ref.partition(":")
    if sep and module in REWARDS:  # 'jpeg:x': a weight that is not a number
        raise ValueError(f"malformed reward spec {ref!r}: {SPEC_FORMS}")
    if sep and re.fullmatch(r"[A-Za-z_][\w.]*", module) and re.fullmatch(r"[A-Za-z_]\w*", function):
        return lambda: import_reward(module, function)
    if re.fullmatch(r"[A-Za-z_][\w.-]*", ref):
        raise ValueError(f"unknown reward {ref!r}; known rewards: {', '.join(REWARDS)} "
                         "(or module:function, url:http://host:port)")
    raise ValueError(f"malformed reward spec {ref!r}: {SPEC_FORMS}")


def import_reward(module, function):
    """module.function, the module imported from the working directory or sys.path."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--reward mymodule:fn` finds mymodule.py where one runs
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise  # the module exists but one of its own imports is missing: the traceback says
        raise ValueError(f"reward '{module}:{function}': no module {module!r} in the working "
                         f"directory ({os.getcwd()}) or on sys.path") from None
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise ValueError(f"reward '{module}:{function}': {getattr(mod, '__file__', module)} has "
                         f"no function {function!r}")
    return fn


def url_reward(url, batch_size=16, timeout=120.0, attempts=3, backoff=1.0):
    """`url:URL`: the reward server at URL (rewards.remote), checked to answer when loaded."""
    check_server(url, min(timeout, 10.0), "fix the url: in the reward spec")
    return remote(url, batch_size, timeout, attempts, backoff)


def check_server(url, timeout=10.0, fix="fix its address"):
    """Raise ValueError unless the server at url answers an HTTP GET within timeout seconds: any
    HTTP answer counts (reward_server.py answers 200, a POST-only server 404 or 405), so that a
    server that is down or hung fails before a run samples anything."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(urllib.request.Request(url, method="GET"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, http.client.HTTPException) as e:
        e = getattr(e, "reason", e)
        if isinstance(e, (socket.timeout, TimeoutError)):
            raise ValueError(f"reward server {url} does not answer (no reply within {timeout:g} "
                             f"s); restart it, or {fix}") from None
        raise ValueError(f"reward server {url} cannot be reached ({e.__class__.__name__}: {e}); "
                         f"start it, or {fix}") from None


# name -> the variable with its server's address, for the registered rewards that are servers
SERVER_VARIABLES = {"geneval": "GENEVAL_URL", "deqa": "DEQA_URL"}


def check_servers(spec, timeout=10.0):
    """Check that every reward server a spec uses answers (check_server): its url: parts, and the
    GENEVAL_URL / DEQA_URL servers of geneval and deqa (an unset variable fails when loaded)."""
    for ref, _ in parse_spec(spec):
        if ref.startswith("url:"):
            check_server(ref[len("url:"):], timeout, "fix the url: in the reward spec")
        elif ref in SERVER_VARIABLES and os.environ.get(SERVER_VARIABLES[ref]):
            variable = SERVER_VARIABLES[ref]
            check_server(os.environ[variable], timeout, f"fix {variable}")


def parse_spec(spec):
    """'ocr' -> [('ocr', 1.0)]; 'jpeg:2' -> [('jpeg', 2.0)]; 'mymod:fn' -> [('mymod:fn', 1.0)];
    'deqa:0.4,url:http://h:8000:0.6' -> [('deqa', 0.4), ('url:http://h:8000', 0.6)]."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) == 1:
        name, _, weight = parts[0].rpartition(":")
        weighted = name in REWARDS and _number(weight) is not None
        blend = [(name, _number(weight))] if weighted else [(parts[0], 1.0)]
    else:
        blend = [(ref.strip(), _number(weight))
                 for ref, _, weight in (p.rpartition(":") for p in parts)]
    refs = [ref for ref, _ in blend]
    bad_weight = any(w is None or not math.isfinite(w) for _, w in blend)
    if bad_weight or not all(refs) or len(set(refs)) < len(refs):
        raise ValueError(f"malformed reward spec {spec!r}: {SPEC_FORMS}")
    for ref in refs:
        reward_loader(ref)  # an unknown name or a malformed REF fails here, before anything loads
    return blend


def load(spec, server=None, **options):
    """A reward by name or blend -> fn(images, prompts, metadata=None) -> np.ndarray [B].

    fn.details(images, prompts, metadata=None) -> list of B dicts (see the module docstring).
    Each option goes to every component whose loader accepts it. server: {timeout, attempts,
    backoff} for the components that are reward servers (the trainers' --reward-* flags); local
    rewards ignore it."""
    blend = parse_spec(spec)
    loaders = {name: reward_loader(name) for name, _ in blend}
    unused = set(options) - {p for f in loaders.values() for p in inspect.signature(f).parameters}
    if unused:
        raise TypeError(f"reward {spec!r} takes no option(s) {sorted(unused)}")
    options = {**(server or {}), **options}
    functions = {name: f(**{k: v for k, v in options.items() if k in inspect.signature(f).parameters})
                 for name, f in loaders.items()}

    def columns(images, prompts, metadata=None):
        images = as_uint8(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images) or (metadata is not None and len(metadata) != len(images)):
            raise ValueError(f"{len(images)} images need as many prompts (got {len(prompts)}) and metadata")
        if len(blend) == 1 and blend[0][1] == 1:
            return as_columns(functions[blend[0][0]](images, prompts, metadata), len(images))
        out = {"reward": np.zeros(len(images))}
        for name, weight in blend:
            part = as_columns(functions[name](images, prompts, metadata), len(images))
            out["reward"] = out["reward"] + weight * part["reward"]
            out.update({name if k == "reward" else f"{name}.{k}": v for k, v in part.items()})
        return out

    def fn(images, prompts, metadata=None):
        return columns(images, prompts, metadata)["reward"]

    def details(images, prompts, metadata=None):
        out = columns(images, prompts, metadata)
        return [{k: _python(v[i]) for k, v in out.items()} for i in range(len(out["reward"]))]

    fn.details, fn.columns, fn.spec = details, columns, spec
    return fn


def as_columns(out, n):
    """A reward function's output -> {"reward": float array [n], other per-image columns}."""
    out = dict(out) if isinstance(out, dict) else {"reward": out}
    out["reward"] = np.asarray(out["reward"], dtype=np.float64).reshape(-1)
    if len(out["reward"]) != n:
        raise ValueError(f"reward function returned {len(out['reward'])} rewards for {n} images")
    return out


def _python(value):
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------- metrics

REAL_METRICS = {"geneval": "geneval", "ocr": "ocr", "pickscore": "pickscore", "deqa": "deqa"}
# reward spec -> factor from its reward to its column's scale (the paper's); other specs: 1
TABLE_SCALE = {"pickscore": 26.0, "deqa": 5.0}
# what the paper's Average divides each column by (paper_average)
AVERAGE_DIVISOR = {"geneval": 1.0, "ocr": 1.0, "deqa": 5.0, "pickscore": 26.0}


def metric_specs(overrides, model_metrics=None):
    """{column: reward spec} of evaluate.py and the held-out evaluation: the paper's metrics, or
    those the model folder names (its flow_opd.json "metrics", how the toy world names its own),
    with 'column=spec' overrides; 'none' drops one."""
    specs = dict(model_metrics or REAL_METRICS)
    for item in (s.strip() for s in overrides.split(",") if s.strip()):
        column, sep, spec = item.partition("=")
        if not sep or not column or not spec:
            raise ValueError(f"--metrics item {item!r}: expected column=reward "
                             "(e.g. deqa=none or ocr=mymodule:ocr)")
        specs[column] = spec
    specs = {column: spec for column, spec in specs.items() if spec != "none"}
    for spec in specs.values():
        parse_spec(spec)  # every spec is checked before any metric loads (a server, a model)
    return specs


def load_metric(spec, server=None, scales=None):
    """A reward spec -> details(images, prompts, metadata) -> one dict per image with the column's
    value under "score" (its reward x TABLE_SCALE or `scales`; GenEval: its strict `correct`) and
    GenEval's "tag". scales: {spec: factor} a model folder adds (flow_opd.json "metric_scales")."""
    details = load(spec, server=server).details
    scale = {**TABLE_SCALE, **(scales or {})}.get(spec, 1.0)

    def scored(images, prompts, metadata):
        rows = details(images, prompts, metadata)
        for row in rows:
            row["score"] = float(row["correct"]) if "correct" in row else float(row["reward"]) * scale
        return rows

    return scored


def score_items(metrics, items, images, quality_tasks=None):
    """Per-image results: the task's metric on its own images, 'deqa' on the images of
    quality_tasks (None: every image). items: (task, i, j, prompt) tuples (common.eval_items),
    images: [N, ...] in their order. A metric that reports GenEval's per-image `correct` also
    gives each of its images a "tag" (summarize averages such a column over tags)."""
    results = [{"i": it.i, "j": it.j, "prompt": it.prompt.text, "scores": {}} for it in items]
    for column, details in metrics.items():
        quality = column == "deqa"
        idx = [k for k, it in enumerate(items) if it.task == column
               or (quality and (quality_tasks is None or it.task in quality_tasks))]
        if not idx:
            continue
        rows = details(images[idx], [items[k].prompt.text for k in idx], [items[k].prompt.metadata for k in idx])
        for k, row in zip(idx, rows):
            if column == "geneval" and "correct" not in row:
                raise ValueError("the geneval metric must report GenEval's per-image 'correct' (and 'tag')")
            results[k]["scores"][column] = float(row["score"])
            if "correct" in row and not quality:
                results[k]["tag"] = row.get("tag") or items[k].prompt.metadata.get("tag") or "all"
    return results


def mean_stderr(values):
    values = np.asarray(values, dtype=np.float64)
    stderr = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else None
    return float(values.mean()), (None if stderr is None else float(stderr))


def summarize(results):
    """Table row (without the model name) from per-image results with task, i, scores (and tag)."""
    per_prompt, tags = {}, {}
    for r in results:
        for column, value in r["scores"].items():
            per_prompt.setdefault(column, {}).setdefault((r["task"], r["i"]), []).append(value)
        if "tag" in r:
            tags[(r["task"], r["i"])] = r["tag"]
    # GenEval-like columns: the task's own column, when its images carry GenEval's tags
    tagged = {task for task, _ in tags}
    row = {"stderr": {}, "n": {}}
    for column, prompts in per_prompt.items():
        means = {key: float(np.mean(v)) for key, v in prompts.items()}
        row["n"][column] = sum(len(v) for v in prompts.values())
        if column in tagged:
            # GenEval's overall score is the mean of its per-tag accuracies
            by_tag = {}
            for key, value in means.items():
                by_tag.setdefault(tags.get(key, "all"), []).append(value)
            stats = {tag: mean_stderr(v) for tag, v in sorted(by_tag.items())}
            row[f"{column}_tags"] = {tag: m for tag, (m, _) in stats.items()}
            row[column] = float(np.mean([m for m, _ in stats.values()]))
            errors = [se for _, se in stats.values()]
            row["stderr"][column] = (None if None in errors else
                                     math.sqrt(sum(se**2 for se in errors)) / len(errors))
        else:
            row[column], row["stderr"][column] = mean_stderr(list(means.values()))
    if all(c in row for c in AVERAGE_DIVISOR):
        row["average"] = paper_average(geneval=row["geneval"], ocr=row["ocr"], pickscore=row["pickscore"],
                                               deqa=row["deqa"])
        errors = {c: row["stderr"][c] for c in AVERAGE_DIVISOR}
        # treats the columns as independent (DeQA shares images with the others: an approximation)
        row["stderr"]["average"] = (None if None in errors.values() else math.sqrt(
            sum((se / AVERAGE_DIVISOR[c]) ** 2 for c, se in errors.items())) / len(errors))
    return row


def evaluate_images(metrics, items, images):
    """The table row (summarize) of images sampled for `items`, and their per-image results. The
    row always has "average": the paper's Average when all four columns are scored, else the same
    mean of column / divisor over the columns that are (a held-out evaluation of some tasks)."""
    results = [{"task": it.task, **r} for it, r in zip(items, score_items(metrics, items, images))]
    row = summarize(results)
    if "average" not in row:
        row["average"] = float(np.mean([row[c] / AVERAGE_DIVISOR.get(c, 1.0) for c in row["n"]]))
    return row, results


def task_metrics(overrides, tasks, model_info=None, server=None):
    """{column: metric} of a held-out evaluation during training on `tasks`: each task's metric and
    the quality metric (deqa) on every image, chosen as evaluate.py chooses them (the model
    folder's flow_opd.json, then the 'column=spec' overrides of --eval-metrics)."""
    model_info = model_info or {}
    specs = metric_specs(overrides, model_info.get("metrics"))
    missing = [t for t in tasks if t not in specs]
    if missing:
        raise ValueError(f"no held-out metric for task(s) {missing}: pass --eval-metrics "
                         f"{missing[0]}=REWARD (the metrics are {sorted(specs)})")
    return {column: load_metric(spec, server, model_info.get("metric_scales"))
            for column, spec in specs.items() if column in tasks or column == "deqa"}
