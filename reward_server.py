"""A reward server in the standard library: serves any reward of rewards.py over JSON HTTP.

    python reward_server.py --reward jpeg --port 8000
    curl -s localhost:8000                     # {"reward": "jpeg"}: a health check

Protocol (the client is rewards.remote): POST / with
    {"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [dict, ...]}
answers 200 {"scores": [float, ...], <other per-image columns>}, 400 for a malformed request,
500 {"error": ...} when scoring fails (the client retries those).

Template for GenEval or DeQA: run this file in the evaluator's own environment (it needs only
numpy and pillow besides rewards.py) and hand `serve` a function of (images uint8 [B, H, W, 3],
prompts, metadata) that returns the columns:

    import reward_server
    def geneval(images, prompts, metadata):            # wraps Flow-GRPO's gen_eval.py
        results = evaluate_image([Image.fromarray(im) for im in images], metadata, only_strict=False)
        return {"reward": [r["score"] for r in results],           # partial credit, for training
                "correct": [bool(r["correct"]) for r in results],  # GenEval's criterion, for eval
                "tag": [r["tag"] for r in results]}
    reward_server.serve(geneval, port=18085)

DeQA returns {"reward": deqa_score / 5} (the client checks scores are in [0, 1]).
"""
import argparse
import json
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

import rewards


def make_server(score, host="127.0.0.1", port=8000, name=None):
    """A ThreadingHTTPServer (not yet serving) for score(images_uint8, prompts, metadata) -> array
    or columns; port 0 picks a free port (server.server_address[1])."""
    lock = threading.Lock()  # one batch at a time: a GPU model is not shared between threads

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._send(200, {"reward": name or getattr(score, "__name__", None)})

        def do_POST(self):
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                images = np.stack([rewards.decode_png(im) for im in request["images"]])
                prompts, metadata = request["prompts"], request.get("metadata")
                if len(prompts) != len(images):
                    raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
            except Exception as e:  # the client sent something we cannot read: do not retry
                return self._send(400, {"error": f"bad request: {e!r}"})
            try:
                with lock:
                    columns = rewards.as_columns(score(images, prompts, metadata), len(images))
                self._send(200, {rewards.WIRE_NAMES.get(k, k): np.asarray(v).tolist() for k, v in columns.items()})
            except Exception as e:
                traceback.print_exc()  # the whole story in the server's log, the gist to the client
                self._send(500, {"error": repr(e)})

        def _send(self, code, answer):
            body = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True  # a slow request must not block shutdown
    return server


def serve(score, host="127.0.0.1", port=8000, name=None):
    server = make_server(score, host, port, name)
    print(f"serving reward {name or score.__name__} on http://{host}:{server.server_address[1]}")
    server.serve_forever()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward", default="jpeg", help="a name or blend of rewards.py, e.g. ocr, pickscore")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    parser.add_argument("--port", type=int, default=8000)
    return parser.parse_args(argv)


def main(args):
    serve(rewards.load(args.reward).columns, args.host, args.port, name=args.reward)


if __name__ == "__main__":
    main(parse_args())
