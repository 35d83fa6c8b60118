import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import reward_server
import rewards

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parent / "data" / "flow_grpo"  # a few real lines, MIT


def random_images(n, size=32, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3), dtype=np.uint8)


def render(lines, size=(384, 160)):
    """Black text on white, one string per line, in a TrueType font (Pillow >= 10.1 ships one)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((16, 24 + 56 * i), line, fill="black", font=ImageFont.load_default(size=36))
    return image


def test_paper_average_matches_model_card_rows():
    assert round(rewards.paper_average(geneval=0.63, ocr=0.59, deqa=4.07, pickscore=21.64), 2) == 0.72
    assert round(rewards.paper_average(geneval=0.92, ocr=0.94, deqa=4.35, pickscore=23.08), 2) == 0.90


def test_as_uint8_accepts_pil_uint8_and_float_tensor():
    images = random_images(2)
    pil = [Image.fromarray(im) for im in images]
    float_chw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # diffusers output_type="pt"
    float_hwc = images.astype(np.float64) / 255  # diffusers output_type="np"
    for form in (pil, images, torch.from_numpy(images), float_chw, float_hwc):
        out = rewards.as_uint8(form)
        assert out.dtype == np.uint8 and out.shape == (2, 32, 32, 3)
        np.testing.assert_array_equal(out, images)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rewards.as_uint8(float_chw * 2 - 1)


def test_unknown_reward_lists_known_names():
    known = r"known rewards: ocr, pickscore, geneval, deqa, jpeg \(or module:function"
    with pytest.raises(ValueError, match=known):
        rewards.load("aesthetic")
    with pytest.raises(ValueError, match="unknown reward 'pickscor'"):
        rewards.load("deqa:0.4,pickscor:0.6")


@pytest.mark.parametrize("spec", ["", "deqa:0.4,", "deqa:x,pickscore:0.6", "deqa:0.4;pickscore:0.6",
                                  "deqa,pickscore", "jpeg:1,jpeg:2", ":0.5", "jpeg:nan", "jpeg:x",
                                  "url:ftp://h:1", "my mod:fn", "mod:fn:0.5:x"])
def test_malformed_blend_says_expected_form(spec):
    with pytest.raises(ValueError, match="REF:weight,REF:weight|url:http://host:port"):
        rewards.load(spec)


@pytest.mark.parametrize("spec,blend", [
    ("ocr", [("ocr", 1.0)]),
    ("jpeg:2", [("jpeg", 2.0)]),  # a registered name with a weight
    ("mymod:fn", [("mymod:fn", 1.0)]),  # one module:function REF, not a name with a weight
    ("toy:reward_deqa", [("toy:reward_deqa", 1.0)]),
    ("url:http://h:8000", [("url:http://h:8000", 1.0)]),  # the port is not a weight
    ("url:http://h:8000/score?v=1", [("url:http://h:8000/score?v=1", 1.0)]),
    ("deqa:0.4, pickscore:0.6", [("deqa", 0.4), ("pickscore", 0.6)]),
    ("toy:reward_deqa:0.08,toy:reward_pickscore:0.6",
     [("toy:reward_deqa", 0.08), ("toy:reward_pickscore", 0.6)]),
    ("url:http://h:8000:0.5,mymod:fn:-1e-3", [("url:http://h:8000", 0.5), ("mymod:fn", -0.001)]),
])
def test_spec_is_one_ref_or_a_blend_split_at_the_last_colon(spec, blend):
    assert rewards.parse_spec(spec) == blend


MODULE = '''import numpy as np
def red(images, prompts, metadata):
    return {"reward": images[..., 0].mean(axis=(1, 2)) / 255,
            "prompt_length": [len(p) for p in prompts]}
def blue(images, prompts, metadata):
    return images[..., 2].mean(axis=(1, 2)) / 255
'''


def test_a_function_in_the_working_directory_is_a_reward(tmp_path, monkeypatch):
    (tmp_path / "my_colour_rewards.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    images, prompts = random_images(3), ["a", "bb", "ccc"]
    red, blue = images[..., 0].mean(axis=(1, 2)) / 255, images[..., 2].mean(axis=(1, 2)) / 255
    np.testing.assert_allclose(rewards.load("my_colour_rewards:red")(images, prompts), red)
    rows = rewards.load("my_colour_rewards:red").details(images, prompts)
    assert [r["prompt_length"] for r in rows] == [1, 2, 3]
    blend = rewards.load("my_colour_rewards:red:0.25,my_colour_rewards:blue:0.75,jpeg:1")
    jpeg = rewards.load("jpeg")(images, prompts)
    np.testing.assert_allclose(blend(images, prompts), 0.25 * red + 0.75 * blue + jpeg)
    with pytest.raises(ValueError, match="no module 'not_there' in the working directory"):
        rewards.load("not_there:red")
    with pytest.raises(ValueError, match=r"my_colour_rewards.py has no function 'green'"):
        rewards.load("my_colour_rewards:green")


def test_register_names_a_reward(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))
    def green(scale=1.0):
        return lambda images, prompts, metadata: scale * images[..., 1].mean(axis=(1, 2))

    rewards.register("mean_green", green)
    images = random_images(2)
    np.testing.assert_allclose(rewards.load("mean_green:3", scale=2.0)(images, ["a", "b"]),
                               6.0 * images[..., 1].mean(axis=(1, 2)))
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("mean_green", lambda: None)
    with pytest.raises(ValueError, match="no ':'"):
        rewards.register("a:b", lambda: None)


def test_any_server_by_url_is_a_reward_and_an_unreachable_one_fails_at_load(serve):
    images, prompts = random_images(5), [f"prompt {i}" for i in range(5)]
    url = serve(reward_server.make_server(rewards.load("jpeg").columns, port=0, name="jpeg"))
    local = rewards.load("jpeg")(images, prompts)
    fn = rewards.load(f"url:{url}", batch_size=2)
    np.testing.assert_allclose(fn(images, prompts), local)
    assert [r["kb"] for r in fn.details(images, prompts)] == pytest.approx(
        [r["kb"] for r in rewards.load("jpeg").details(images, prompts)])
    np.testing.assert_allclose(rewards.load(f"url:{url}:0.5,jpeg:0.5")(images, prompts), local)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ValueError, match=f"reward server {down} cannot be reached"):
        rewards.load(f"url:{down}")


def test_blend_is_weighted_sum_of_components(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "ones", lambda: lambda images, prompts, metadata: np.ones(len(images)))
    images, prompts = random_images(3), ["a", "b", "c"]
    jpeg = rewards.load("jpeg")(images, prompts)
    blend = rewards.load("jpeg:0.4, ones:0.6")
    np.testing.assert_allclose(blend(images, prompts), 0.4 * jpeg + 0.6)
    row = blend.details(images, prompts)[0]
    assert row["jpeg"] == pytest.approx(jpeg[0]) and row["ones"] == 1 and row["jpeg.kb"] > 0
    np.testing.assert_allclose(rewards.load("jpeg:2")(images, prompts), 2 * jpeg)


def test_load_rejects_options_no_component_takes():
    with pytest.raises(TypeError, match="url"):
        rewards.load("jpeg", url="http://x")


def test_fn_checks_prompt_count_and_reward_shape(monkeypatch):
    with pytest.raises(ValueError, match="2 images need as many prompts"):
        rewards.load("jpeg")(random_images(2), ["one prompt"])
    monkeypatch.setitem(rewards.REWARDS, "short", lambda: lambda images, prompts, metadata: np.ones(1))
    with pytest.raises(ValueError, match="returned 1 rewards for 2 images"):
        rewards.load("short")(random_images(2), ["a", "b"])


def test_toy_rewards_load_by_module_and_rewards_does_not_import_toy():
    import toy
    code = "import sys, rewards; assert 'toy' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=Path(rewards.__file__).parent, check=True)
    images = random_images(2)
    by_spec = rewards.load("toy:reward_deqa")(images, ["a", "b"])
    np.testing.assert_array_equal(by_spec, toy.reward_deqa(images))


def test_jpeg_is_negative_file_size_in_kb_over_500(tmp_path):
    flat = np.full((1, 64, 64, 3), 128, np.uint8)
    images = np.concatenate([flat, random_images(1, 64)])
    rows = rewards.load("jpeg").details(images, ["", ""])
    for image, row in zip(images, rows):
        Image.fromarray(image).save(tmp_path / "x.jpg", quality=95)
        kb = os.path.getsize(tmp_path / "x.jpg") / 1000
        assert row["kb"] == pytest.approx(kb) and row["reward"] == pytest.approx(-kb / 500)
    assert rows[0]["reward"] > rows[1]["reward"]  # flat compresses better than noise


def test_ocr_target_from_real_prompts():
    prompts = (DATA / "ocr" / "test.txt").read_text().splitlines()
    assert rewards.ocr_target(prompts[0]) == "springcollection2024"
    assert rewards.ocr_target(prompts[1]) == "stepgoalachieved"
    assert rewards.ocr_target(prompts[2]) == "foreveryours"
    assert rewards.ocr_target('a "Cafe" sign next to a "Bar" sign') == "cafe"  # the first pair only
    assert all(rewards.ocr_target(p) for p in prompts)


@pytest.mark.parametrize("prompt", ["a sign with no quotes", 'an unclosed "quote', 'empty quotes " "'])
def test_ocr_prompt_without_quoted_text_raises(prompt):
    with pytest.raises(ValueError, match="double quotes"):
        rewards.load("ocr")(np.zeros((1, 32, 32, 3), np.uint8), [prompt])


def test_levenshtein_and_ocr_score_formula():
    assert rewards.levenshtein("kitten", "sitting") == 3
    assert rewards.levenshtein("", "abc") == rewards.levenshtein("abc", "") == 3
    assert rewards.ocr_score("helowrld", "helloworld") == pytest.approx(0.8)
    assert rewards.ocr_score("xxhelloworldyy", "helloworld") == 1.0  # contained: full reward
    assert rewards.ocr_score("a much longer unrelated text", "hi") == 0.0  # distance capped at len


def test_ocr_lines_join_in_reading_order():
    def box(x, y, text, h=30, w=80):
        return [[[x, y], [x + w, y], [x + w, y + h], [x, y + h]], text, 0.9]

    # the engine's order is scrambled; the second word of line one sits 6 px lower (tilt)
    result = [box(10, 100, "2024"), box(120, 16, "Collection"), box(10, 10, "Spring")]
    assert rewards.reading_order(result) == "SpringCollection2024"
    assert rewards.reading_order(None) == ""


def test_ocr_scores_rendered_text():
    images = [render(["Hello World"]), render([]), render(["Helo Wrld"]), render(["Spring Collection", "2024"])]
    prompts = ['a sign that says "Hello World"'] * 3 + ['a runway backdrop displaying "Spring Collection 2024"']
    rows = rewards.load("ocr").details(images, prompts)
    assert [r["text"] for r in rows] == ["helloworld", "", "helowrld", "springcollection2024"]
    assert [r["reward"] for r in rows] == [1.0, 0.0, pytest.approx(1 - 2 / 10), 1.0]


def tiny_clip(path):
    """A random CLIP (model + processor) saved like the hub's, so loading is tested too."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter], vocab[letter + "</w>"] = len(vocab), len(vocab) + 1
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path / "processor")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(path / "model")
    return tokenizer, image_processor, model


def test_pickscore_is_clip_logit_over_26(tmp_path, monkeypatch):
    tokenizer, image_processor, model = tiny_clip(tmp_path)
    images, prompts = random_images(3), ["a red cat", "a blue dog on a mat", "sign"]
    # independent reference: CLIP's own forward on hand-normalised pixels (32 px needs no resize)
    mean, std = np.array(image_processor.image_mean), np.array(image_processor.image_std)
    pixels = torch.tensor(((images / 255 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
    text = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=pixels, **text).logits_per_image.diagonal().double().numpy()

    fn = rewards.load("pickscore", processor=str(tmp_path / "processor"), model=str(tmp_path / "model"), device="cpu")
    np.testing.assert_allclose(fn(images, prompts), logits / 26, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r["raw"] for r in fn.details(images, prompts)], logits, rtol=1e-5, atol=1e-5)

    monkeypatch.setenv("PICKSCORE_PROCESSOR", str(tmp_path / "processor"))
    monkeypatch.setenv("PICKSCORE_MODEL", str(tmp_path / "model"))
    np.testing.assert_allclose(rewards.load("pickscore", device="cpu")(images, prompts), logits / 26, rtol=1e-5)


@pytest.fixture
def serve():
    """Start a server on a free 127.0.0.1 port in a thread; all are shut down after the test."""
    servers = []

    def start(server):
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def fake_server(status=200, body=b"", delay=0.0):
    """Answers every POST with the same status and body after `delay`; counts the requests."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            Handler.hits += 1
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay)
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client timed out and left
                pass

        def log_message(self, *args):
            pass

    Handler.hits = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server, Handler


def test_server_round_trip_equals_local_scoring(serve):
    images, prompts = random_images(5), [f"prompt {i}" for i in range(5)]
    url = serve(reward_server.make_server(rewards.load("jpeg").columns, port=0, name="jpeg"))
    remote = rewards.remote(url, batch_size=2)  # 3 requests
    columns = remote(images, prompts, None)
    np.testing.assert_allclose(columns["reward"], rewards.load("jpeg")(images, prompts))  # PNG is lossless
    np.testing.assert_allclose(columns["kb"], [r["kb"] for r in rewards.load("jpeg").details(images, prompts)])
    assert json.load(urllib.request.urlopen(url)) == {"reward": "jpeg"}


def test_geneval_client_returns_correct_and_tag_per_image(serve, monkeypatch):
    metadata = [json.loads(line) for line in (DATA / "geneval" / "test_metadata.jsonl").open()][:3]

    def geneval_like(images, prompts, metadata):  # stands in for the detector: echoes what it got
        assert all(p == m["prompt"] for p, m in zip(prompts, metadata))
        return {"reward": [0.5] * len(images), "correct": [m["tag"] == "counting" for m in metadata],
                "tag": [m["tag"] for m in metadata]}

    monkeypatch.setenv("GENEVAL_URL", serve(reward_server.make_server(geneval_like, port=0)))
    fn = rewards.load("geneval", batch_size=2)
    rows = fn.details(random_images(3), [m["prompt"] for m in metadata], metadata)
    assert rows == [{"reward": 0.5, "correct": True, "tag": "counting"},
                    {"reward": 0.5, "correct": False, "tag": "color_attr"},
                    {"reward": 0.5, "correct": False, "tag": "color_attr"}]


def test_deqa_client_reports_raw_score_times_5(serve, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "fixed", lambda: lambda images, prompts, metadata: np.full(len(images), 0.8))
    url = serve(reward_server.make_server(rewards.load("fixed").columns, port=0))
    rows = rewards.load("deqa", url=url).details(random_images(2), ["a", "b"])
    assert rows[0]["reward"] == pytest.approx(0.8) and rows[0]["raw"] == pytest.approx(4.0)


def test_missing_server_url_says_which_variable(monkeypatch):
    monkeypatch.delenv("DEQA_URL", raising=False)
    with pytest.raises(ValueError, match="DEQA_URL"):
        rewards.load("deqa")


def test_server_down_names_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.time()
    with pytest.raises(rewards.RewardServerError, match=f"{url} failed after 3 attempt"):
        rewards.load("deqa", url=url, attempts=3, backoff=0.01)(random_images(1), ["a"])
    assert time.time() - start < 5


BAD_ANSWERS = {
    "not json": b"<html>Bad Gateway</html>",
    "no scores": b'{"outputs": [0.5]}',
    "wrong length": b'{"scores": [0.5, 0.5, 0.5]}',
    "non-numeric": b'{"scores": ["0.5", 0.5]}',
    "nan": b'{"scores": [NaN, 0.5]}',
    "out of range": b'{"scores": [4.1, 3.2]}',  # raw DeQA instead of DeQA / 5
    "extra column wrong length": b'{"scores": [0.5, 0.5], "correct": [true], "tags": ["a", "b"]}',
    "missing correct": b'{"scores": [0.5, 0.5], "tags": ["a", "b"]}',
}


@pytest.mark.parametrize("case", BAD_ANSWERS)
def test_bad_answer_raises_clear_error(serve, case):
    server, handler = fake_server(body=BAD_ANSWERS[case])
    url = serve(server)
    message = {"not json": "not JSON", "no scores": '"scores" list', "wrong length": "3 entries for 2 images",
               "non-numeric": "not a finite number", "nan": "not a finite number", "out of range": r"outside \[0, 1\]",
               "extra column wrong length": '"correct" has 1 entries', "missing correct": 'missing "correct"'}[case]
    with pytest.raises(rewards.RewardServerError, match=message):
        rewards.load("geneval", url=url, backoff=0.01)(random_images(2), ["a", "b"], [{}, {}])
    assert handler.hits == 1  # a server that answers nonsense is broken: no retry


def test_http_500_is_retried_then_raises(serve):
    server, handler = fake_server(status=500, body=b'{"error": "CUDA out of memory"}')
    url = serve(server)
    with pytest.raises(rewards.RewardServerError, match=f"{url} failed after 3 attempt.*HTTP 500.*CUDA out of memory"):
        rewards.load("deqa", url=url, attempts=3, backoff=0.01)(random_images(1), ["a"])
    assert handler.hits == 3


def test_timeout_raises_within_bounded_time(serve):
    server, handler = fake_server(body=b'{"scores": [0.5]}', delay=3)
    url = serve(server)
    start = time.time()
    with pytest.raises(rewards.RewardServerError, match=f"{url} failed after 2 attempt.*timed out"):
        rewards.load("deqa", url=url, timeout=0.2, attempts=2, backoff=0.01)(random_images(1), ["a"])
    assert time.time() - start < 2 and handler.hits == 2


def test_reference_server_rejects_bad_request_and_reports_errors(serve, monkeypatch):
    def broken(images, prompts, metadata):
        raise RuntimeError("evaluator crashed")

    url = serve(reward_server.make_server(broken, port=0))
    with pytest.raises(rewards.RewardServerError, match="HTTP 500.*evaluator crashed"):
        rewards.remote(url, attempts=2, backoff=0.01)(random_images(1), ["a"], None)
    with pytest.raises(rewards.RewardServerError, match="after 1 attempt.*HTTP 400.*bad request"):
        remote = rewards.remote(url, attempts=3, backoff=0.01)
        monkeypatch.setattr(rewards, "encode_png", lambda image: "not base64 png")
        remote(random_images(1), ["a"], None)
