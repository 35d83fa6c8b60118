"""The checks of runs/sd35m.sh that need Python, before a multi-hour run: does CUDA see the GPUs, is
each model and teacher hub id in the local cache or reachable, does each reward server score one
image. Prints one line per problem, 'VARIABLE: what is wrong and what to do', and nothing when all
is well (exit status 0 either way: runs/sd35m.sh lists these with its own problems).

    python runs/preflight.py --gpus 8 --hub MODEL=stabilityai/stable-diffusion-3.5-medium \
        --hub OCR_TEACHER=jieliu/SD3.5M-FlowGRPO-Text --geneval-url http://host:18085 \
        --deqa-url http://host:18086
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402

# files that show a hub id is what it should be: a diffusers pipeline, or a LoRA (PEFT, diffusers)
PIPELINE_FILES = ["model_index.json"]
LORA_FILES = ["adapter_config.json", "pytorch_lora_weights.safetensors"]
GENEVAL_EXAMPLE = {"tag": "single_object", "include": [{"class": "cat", "count": 1}],
                   "prompt": "a photo of a cat"}


def gpu_problems(wanted):
    """CUDA must see the GPUs the launch asks for on this node."""
    import torch
    found = torch.cuda.device_count()
    if found < wanted:
        return [f"NPROC_PER_NODE: CUDA sees {found} GPU(s) on this node, the launch asks for "
                f"{wanted} (check CUDA_VISIBLE_DEVICES and the driver; CHECK_GPUS=0 skips this "
                "check, e.g. on a login node)"]
    return []


def hub_problem(variable, repo, files, timeout):
    """None when one of `files` of the hub repo is in the local cache or answers on the hub, else
    the problem."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
        return None
    for f in files:
        try:
            get_hf_file_metadata(hf_hub_url(repo, f), timeout=timeout)
            return None
        except EntryNotFoundError:
            continue
        except GatedRepoError:
            return (f"{variable}: {repo} is gated: accept its licence on huggingface.co and log in "
                    "(hf auth login, or HF_TOKEN)")
        except RepositoryNotFoundError:
            return f"{variable}: {repo} is not on the hub (or private: log in with hf auth login)"
        except Exception as e:  # no network, a proxy, a timeout
            return (f"{variable}: {repo} is not in the local cache and the hub cannot be reached "
                    f"({type(e).__name__}: {str(e)[:120]}); download it where there is a network "
                    f"(hf download {repo}) or point {variable} at a local folder")
    return f"{variable}: {repo} has none of {files} (is it the right repository?)"


def geneval_example(data_root):
    """One row of the data's GenEval test metadata (the request a run sends), or a built-in one."""
    try:
        with open(os.path.join(data_root, "geneval", "test_metadata.jsonl")) as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return GENEVAL_EXAMPLE


def server_problem(variable, url, data_root, timeout):
    """None when the reward server at url scores one 512 px image as a run asks, else why not."""
    image = np.full((1, 512, 512, 3), 127, dtype=np.uint8)
    try:
        if variable == "GENEVAL_URL":
            row = geneval_example(data_root)
            rewards.geneval(url, timeout=timeout, attempts=1)(image, [row["prompt"]], [row])
        else:
            rewards.deqa(url, timeout=timeout, attempts=1)(image, ["a photo of a cat"], None)
    except (rewards.RewardServerError, ValueError) as e:
        return f"{variable}: {e} (start the server, see README; one image was sent)"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=0, help="GPUs this node must see (0: no check)")
    p.add_argument("--hub", action="append", default=[], metavar="VARIABLE=ID",
                   help="a hub id to find in the cache or on the hub; MODEL is a pipeline, the "
                        "others LoRAs")
    p.add_argument("--geneval-url", default=None)
    p.add_argument("--deqa-url", default=None)
    p.add_argument("--data-root", default="dataset")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds for each hub or server request")
    args = p.parse_args(argv)
    problems = gpu_problems(args.gpus) if args.gpus > 0 else []
    for item in args.hub:
        variable, _, repo = item.partition("=")
        files = PIPELINE_FILES if variable == "MODEL" else LORA_FILES
        problems.append(hub_problem(variable, repo, files, args.timeout))
    for variable, url in (("GENEVAL_URL", args.geneval_url), ("DEQA_URL", args.deqa_url)):
        if url:
            problems.append(server_problem(variable, url, args.data_root, args.timeout))
    for problem in filter(None, problems):
        print(problem)


if __name__ == "__main__":
    main()
