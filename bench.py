"""Speed and memory of each stage against the released layout, in one run, as ratios (nanoGPT's bench.py).

    python bench.py --out out/bench           # ~5 min on 2 CPU cores, 1 thread: a random 102M SD3 transformer
    python bench.py --quick --out /tmp/bench  # seconds: a tiny random transformer (tests/test_bench.py)
    python bench.py --model stabilityai/stable-diffusion-3.5-medium --device cuda --dtype bf16 --out out/bench-sd35m
    python bench.py --profile ...             # + torch.profiler op tables of a GRPO and an OPD step

Each configuration runs in a fresh process, forked from a server process that only did the imports, so
that its peak memory is its own (`python bench.py --one NAME` runs one by hand). It builds the model, warms
up with one forward/backward and times one training step made of the stages' own functions
(common.on_policy_rollouts, opd.distill with opd.teacher_velocities, teacher_grpo.grpo_update):

    grpo     a Flow-GRPO step on one model (policy LoRA; the KL reference is the adapter switched off):
             the memory reference, and where a step's time goes (rollout / reward / training)
    shared   an OPD step, 3 routed teachers + the MAR anchor as adapters on the student's base (opd.py);
             then, timed in the same warm process after its memory is read: the step at the fast settings
             (--states 2 and CFG absorption, --student-cfg 1), one state's teacher calls batched per
             teacher vs one per prompt, and common.rollout vs diffusers' StableDiffusion3Pipeline (same
             steps, batch and latents)
    copies   the same OPD step in the released layout: K + 1 separate copies of the transformer, one per
             teacher and anchor, each with its LoRA attached, beside the student's model

A step is the paper's (10 SDE steps, 9 trained, CFG 4.5, --loss kl, MAR 0.1, merge init) on 3 prompts,
one per task, x --group-size 2 samples, in one micro-batch and one update.
Memory: on CPU the process's peak RSS (ru_maxrss) minus its RSS right after the imports (torch, diffusers,
transformers, peft and the stages), i.e. the model, adapters, optimizer state and activations but not the
interpreter and libraries; on CUDA torch.cuda.max_memory_allocated.
Time inside the transformer: hooks around its forward and from its output gradient to the end of the
backward pass (synchronised on CUDA); the rest of a step (sampler math, losses, adapter switches,
optimizer, Python) is the overhead.
"""
import argparse
import contextlib
import copy
import functools
import importlib
import json
import multiprocessing
import os
import resource
import sys
import time

PRELOAD = ["torch", "peft", "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3", "common", "opd",
           "teacher_grpo", "rewards", "toy"]  # everything a step imports (the SD3 pipeline brings its models)
CONFIGS = ["grpo", "shared", "copies"]
TOKENS = 16  # CLIP context of the random model (the toy's; its longest prompt has 13 tokens)
TASKS = ["geneval", "ocr", "pickscore"]  # one teacher each, as in the paper; prompts from the toy world
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks, for MFU


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench", help="bench.json, table.md and one <config>.json each")
    p.add_argument("--model", default=None,
                   help="SD3 diffusers folder or hub id (default: a random SD3 transformer built in-process)")
    p.add_argument("--layers", type=int, default=5, help="random model: joint blocks")
    p.add_argument("--heads", type=int, default=12, help="random model: attention heads of 64 dims (12: 768 wide)")
    p.add_argument("--patch-size", type=int, default=8, help="random model: patch size on 32 px (8: 16 image tokens)")
    p.add_argument("--rank", type=int, default=16,
                   help="LoRA rank of teachers, anchor and GRPO policy (16 on 768 wide = SD3.5-M's 32 on 1536)")
    p.add_argument("--group-size", type=int, default=2, help="samples per prompt (3 prompts, one per task)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps of a rollout (the paper's 10)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: shared 2-core machines)")
    p.add_argument("--reward", default=None, help="GRPO reward spec for every task (default: each task's toy reward)")
    p.add_argument("--profile", action="store_true",
                   help="one more GRPO and OPD step under torch.profiler: <out>/profile_{grpo,shared}.txt")
    p.add_argument("--quick", action="store_true", help="a tiny transformer and 5 sampling steps: seconds (the test)")
    p.add_argument("--one", choices=CONFIGS, default=None, help=argparse.SUPPRESS)  # a child process: one config
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.layers, args.heads, args.patch_size, args.rank, args.steps = 2, 4, 4, 4, 5
    return args


# ----------------------------------------------------------------------------- the parent: one process per config

def main(args):
    if args.one:
        return run_one(args)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    if not args.model:  # trained once here: a BPE trained in each process could number its tokens differently
        import toy
        toy.train_tokenizer(os.path.join(args.out, "tokenizer"), TOKENS)
    # A fresh process per config, forked from a server process that did the imports once (~8 s each here)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = {}
    for name in CONFIGS:
        child = ctx.Process(target=run_one, args=(parse_args(args.argv + ["--one", name]),))
        child.start()
        child.join()
        if child.exitcode:
            raise RuntimeError(f"bench configuration {name!r} failed (exit code {child.exitcode}); "
                               "its traceback is above")
        with open(os.path.join(args.out, f"{name}.json")) as f:
            results[name] = json.load(f)
    summary = summarize(results)
    summary["seconds"] = time.time() - started
    summary["command"] = "python bench.py " + " ".join(args.argv)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({**summary, "configs": results}, f, indent=1)
    table = markdown(summary, results)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    return summary


def summarize(r):
    """The ratios the README's goals are stated in."""
    grpo, shared, copies = (r[n] for n in CONFIGS)
    fast, sampler = shared["fast"], shared["sampler"]
    return {
        "memory_ratio_shared": shared["memory_mb"] / grpo["memory_mb"],
        "memory_ratio_copies": copies["memory_mb"] / grpo["memory_mb"],
        "time_ratio_shared_vs_copies": copies["shared"]["step_time"] / copies["step_time"],
        "overhead_fraction": shared["overhead_fraction"],
        "fast_speedup": shared["step_time"] / fast["step_time"],
        "sampler_vs_diffusers": sampler["ours_time"] / sampler["diffusers_time"],
        "teacher_forwards": shared["teacher_forwards"],
        "teacher_forwards_per_prompt": shared["teacher_forwards_per_prompt"],
        "teacher_time_batched_vs_per_prompt": shared["teacher_time_batched"] / shared["teacher_time_per_prompt"],
        "adapter_switch_ms": shared["adapter_switch_ms"],
        "fast_teacher_forwards": fast["teacher_forwards"],
        "fast_teacher_steps": fast["teacher_steps"],
        "grpo_split": {k: grpo[k] / grpo["step_time"] for k in ("rollout_time", "reward_time", "train_time")},
        "loss_shared_minus_copies": abs(shared["loss"] - copies["loss"]),
        "model": shared["model"], "params_m": shared["params_m"], "device": shared["device"],
        "dtype": shared["dtype"], "threads": shared["threads"],
    }


def markdown(s, r):
    grpo, shared, copies = (r[n] for n in CONFIGS)
    fast, sampler = shared["fast"], shared["sampler"]
    mb = lambda c: f"{c['memory_mb']:.0f} MB"  # noqa: E731
    sec = lambda c, k="step_time": f"{c[k]:.2f} s"  # noqa: E731
    split = s["grpo_split"]
    rows = [
        ("peak memory, OPD shared base (3 teachers + anchor) / GRPO, one model", f"{s['memory_ratio_shared']:.2f}x",
         "<= 1.15x", s["memory_ratio_shared"] <= 1.15, f"{mb(shared)} / {mb(grpo)}"),
        ("peak memory, released layout (K + 1 copies) / GRPO", f"{s['memory_ratio_copies']:.2f}x", "about 5x",
         None, f"{mb(copies)} / {mb(grpo)}"),
        ("OPD step time, shared base / copies (back to back in one process)",
         f"{s['time_ratio_shared_vs_copies']:.2f}x", "<= 1.0x", s["time_ratio_shared_vs_copies"] <= 1.0,
         f"{sec(copies['shared'])} / {sec(copies)}"),
        ("share of the OPD step outside transformer forward/backward", f"{100 * s['overhead_fraction']:.1f}%",
         "<= 10%", s["overhead_fraction"] <= 0.10, f"{shared['inside_time']:.2f} s inside of {sec(shared)}"),
        ("speed-up of --states 2 + CFG absorption", f"{s['fast_speedup']:.2f}x", ">= 2x", s["fast_speedup"] >= 2,
         f"{sec(shared)} / {sec(fast)}; quality: see README"),
        ("teacher forwards per step, batched per routed teacher / one per prompt",
         f"{s['teacher_forwards']} / {s['teacher_forwards_per_prompt']}", "", None,
         f"teacher calls of one state: {shared['teacher_time_batched']:.3f} s batched, "
         f"{shared['teacher_time_per_prompt']:.3f} s per prompt"),
        ("teacher forwards per step with --states 2", f"{s['fast_teacher_forwards']}", "", None,
         f"on sampling steps {s['fast_teacher_steps']}"),
        ("one adapter switch, common.use_adapter (5 per supervised state)", f"{s['adapter_switch_ms']:.1f} ms", "",
         None, f"{5 * s['adapter_switch_ms'] * len(shared['supervised_steps']) / 1000:.2f} s of the OPD step"),
        ("sampler / diffusers' StableDiffusion3Pipeline", f"{s['sampler_vs_diffusers']:.2f}x", "<= 1.05x",
         s["sampler_vs_diffusers"] <= 1.05, f"{sec(sampler, 'ours_time')} / {sec(sampler, 'diffusers_time')}"),
        ("GRPO step: rollout / reward / training", " / ".join(f"{100 * split[k]:.0f}%" for k in split), "", None,
         " / ".join(sec(grpo, k) for k in ("rollout_time", "reward_time", "train_time"))),
    ]
    lines = ["| measure | value | goal | met | measured |", "|---|---|---|---|---|"]
    for name, value, goal, met, detail in rows:
        lines.append(f"| {name} | {value} | {goal} | {'' if met is None else 'yes' if met else 'no'} | {detail} |")
    speed = [f"{n}: {c['tokens_per_s']:.0f} tokens/s" + (f", MFU {100 * c['mfu']:.1f}%" if c["mfu"] else "")
             for n, c in (("grpo", grpo), ("shared", shared), ("copies", copies), ("fast", fast))]
    lines += ["", f"{s['model']} ({s['params_m']:.0f}M parameters), {s['device']}, {s['dtype']}, "
              f"{s['threads']} thread(s); {s['seconds']:.0f} s in all. " + "; ".join(speed) + ".", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a child: one config

def run_one(args):
    import numpy as np
    import torch
    import common
    import opd
    import rewards
    import teacher_grpo
    import toy
    for module in PRELOAD:  # already there when forked from the server; imported here when run by hand
        importlib.import_module(module)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    d = common.setup_distributed(args.device, args.threads)
    dtype_name = args.dtype or ("bf16" if d.device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    if args.model:
        pipe = common.load_pipeline(args.model, d.device, dtype)
        defaults = common.model_defaults(args.model) if os.path.isdir(args.model) else {}
        resolution, max_seq = defaults.get("resolution", 512), defaults.get("max_sequence_length", 128)
    else:
        pipe = random_pipeline(args).to(d.device, dtype)
        resolution, max_seq = toy.RESOLUTION, 1
    transformer = pipe.transformer
    rng = np.random.default_rng(0)
    prompts = [common.Prompt(text, task, meta or {}) for task in TASKS for text, meta in [toy.sample_prompt(task, rng)]]
    flags = ["--model", args.model or "random", "--batch-size", str(len(TASKS)), "--group-size", str(args.group_size),
             "--steps", str(args.steps), "--updates-per-step", "1", "--micro-batch", str(len(TASKS) * args.group_size),
             "--resolution", str(resolution), "--max-sequence-length", str(max_seq), "--mixed-precision", dtype_name,
             "--rank", str(args.rank), "--alpha", str(2 * args.rank), "--out", args.out]
    t = common.timesteps(args.steps).to(d.device)
    local = slice(0, len(TASKS) * args.group_size)
    n_params = sum(p.numel() for p in transformer.parameters())
    meter = Meter(d.device, n_params, transformer.config.patch_size)
    result = {"model": args.model or f"random SD3 ({args.layers} blocks x {64 * args.heads} wide, {resolution} px)",
              "params_m": n_params / 1e6, "device": str(d.device), "dtype": dtype_name, "threads": args.threads}

    if args.one == "grpo":
        stage = teacher_grpo.parse_args(flags)
        transformer.add_adapter(common.lora_config(args.rank, 2 * args.rank), "policy")
        params = trainable(transformer)
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        reward_fns = {task: rewards.load(args.reward or f"toy:reward_{task}") for task in TASKS}
        train_steps = list(range(common.trained_steps(stage)))
        meter.attach(transformer)
        warm_up(pipe, prompts, max_seq, resolution, d.device)
        step = functools.partial(grpo_step, pipe, transformer, optimizer, params, reward_fns, prompts, stage, local, t,
                                 train_steps, d, meter)
        result.update(step(), memory_mb=peak_memory_mb(d.device, baseline_kb))
        if args.profile:  # one more step under torch.profiler, after the measurements
            with profiled(args.out, "grpo", d.device):
                step()
    else:
        names = [f"teacher_{task}" for task in TASKS] + ["anchor"]
        if args.one == "copies":  # the released layout: a full copy of the transformer per teacher and anchor
            models = {name: copy.deepcopy(transformer) for name in names}
            for name, model in models.items():
                random_lora(model, name, args.rank)
                model.requires_grad_(False)
                meter.attach(model, label=name)
            teacher_fn = functools.partial(copies_velocities, {task: models[f"teacher_{task}"] for task in TASKS},
                                           models["anchor"])
            teacher_states = {name: lora_state(model, name) for name, model in models.items()}
        else:  # ours: every teacher and the anchor an adapter on the student's base
            teacher_fn = attach_adapters(transformer, names, args.rank)
            teacher_states = {name: lora_state(transformer, name) for name in names}
        # opd.py's merge init: the student starts as the exact merge of the teachers (rank 3 r)   (MERGE)
        merged = common.merge_loras([teacher_states[f"teacher_{task}"] for task in TASKS])
        rank = merged[next(iter(merged))].shape[0]
        common.add_lora_from_state(transformer, "student", merged, {"r": rank, "lora_alpha": rank})
        for n, p in transformer.named_parameters():
            p.requires_grad_(".student." in n)
        common.use_adapter(transformer, "student")
        params = trainable(transformer)
        stage = opd.parse_args(flags)
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        meter.attach(transformer)
        warm_up(pipe, prompts, max_seq, resolution, d.device)
        step = functools.partial(opd_step, pipe, transformer, optimizer, params, prompts, flags, local, t, d, meter)
        result.update(step(teacher_fn), memory_mb=peak_memory_mb(d.device, baseline_kb))
        batch = result.pop("batch")
        # time only, after the memory is read, in the same warm process (separate processes drift on a busy machine)
        if args.one == "copies":  # the same step in our layout, back to back: the time ratio of the layouts
            result["shared"] = step(attach_adapters(transformer, names, args.rank))
            result["shared"].pop("batch")
        if args.one == "shared":  # the fast settings, one state's teacher calls, the sampler against diffusers
            result["fast"] = step(teacher_fn, ["--states", "2", "--student-cfg", "1"])
            result["fast"].pop("batch")
            result.update(bench_teacher_calls(batch, meter))
            result["sampler"] = bench_sampler(pipe, prompts, args, resolution, max_seq, t, d.device, meter)
            result["adapter_switch_ms"] = adapter_switch_ms(transformer)
            if args.profile:  # one more step under torch.profiler, after the measurements
                with profiled(args.out, "shared", d.device):
                    step(teacher_fn)
    with open(os.path.join(args.out, f"{args.one}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def grpo_step(pipe, transformer, optimizer, params, reward_fns, prompts, stage, local, t, train_steps, d, meter):
    """One Flow-GRPO step as teacher_grpo.py runs it: rollouts, rewards and advantages, teacher_grpo.grpo_update."""
    import torch
    import common
    import teacher_grpo
    t0 = meter.start()
    batch = common.on_policy_rollouts(pipe, prompts, stage, 0, local, stage.cfg, d.device, t)
    t1 = meter.now()
    images = common.decode(pipe, batch.xs[:, -1], stage.sample_batch)
    scores = common.score(reward_fns, images, batch.prompts).to(d.device)
    advantages, keep = common.group_advantages(scores, stage.group_size, stage.adv_clip)
    t2 = meter.now()
    lora = common.TrainedLoRA(transformer, params, optimizer, None)
    logs = teacher_grpo.grpo_update(lora, batch, advantages, keep, t, train_steps, stage, d)
    t3 = meter.now()
    return {**meter.report(t3 - t0), "rollout_time": t1 - t0, "reward_time": t2 - t1, "train_time": t3 - t2,
            "loss": torch.stack(logs).mean(0)[0].item()}


def adapter_switch_ms(transformer, n=20):
    """Milliseconds of one common.use_adapter switch (opd.py makes 5 a supervised state: teachers, anchor, student)."""
    import common
    start = time.perf_counter()
    for _ in range(n):
        common.use_adapter(transformer, "anchor")
        common.use_adapter(transformer, "student")
    return (time.perf_counter() - start) / (2 * n) * 1000


def opd_step(pipe, transformer, optimizer, params, prompts, flags, local, t, d, meter, teacher_fn, extra=()):
    """One OPD step as opd.py runs it (rollouts, then opd.distill), timed and counted by the meter."""
    import torch
    import common
    import opd
    stage = opd.parse_args(flags + list(extra))
    teacher_fn = functools.partial(teacher_fn, cfg=stage.teacher_cfg)
    supervised = opd.supervised_steps(stage, 0)
    t0 = meter.start()
    batch = common.on_policy_rollouts(pipe, prompts, stage, 0, local, stage.student_cfg, d.device, t)
    t1 = meter.now()
    routed = [p.task for p in batch.prompts]
    lora = common.TrainedLoRA(transformer, params, optimizer, None)
    logs, _, _ = opd.distill(lora, teacher_fn, batch, routed, t, supervised, stage, d)
    t2 = meter.now()
    calls = [c for c in meter.calls if c[0].startswith("teacher_")]
    step_of = lambda v: min(range(len(t)), key=lambda i: abs(t[i].item() - v))  # noqa: E731
    return {**meter.report(t2 - t0), "rollout_time": t1 - t0, "train_time": t2 - t1,
            "loss": torch.stack(logs).mean(0)[0].item(), "teacher_forwards": len(calls),
            "anchor_forwards": sum(c[0] == "anchor" for c in meter.calls),
            "teacher_forwards_per_prompt": len(batch.prompts) * len(supervised), "supervised_steps": supervised,
            "teacher_steps": sorted({step_of(c[1]) for c in calls}),
            "batch": (teacher_fn, routed, batch.xs[:, supervised[-1]], t[supervised[-1]], batch.cond, batch.uncond)}


def random_pipeline(args):
    """The toy's pipeline (two tiny random CLIP encoders, identity VAE on 32 px, no T5) around a random SD3
    transformer of --layers blocks, --heads x 64 wide, patch --patch-size."""
    import torch
    import toy
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    folder = os.path.join(args.out, "tokenizer")
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=TOKENS)
    torch.manual_seed(0)
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        projection_dim=32, max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        for _ in range(2)]
    res = toy.RESOLUTION
    transformer = SD3Transformer2DModel(
        sample_size=res, patch_size=args.patch_size, in_channels=3, out_channels=3, num_layers=args.layers,
        attention_head_dim=64, num_attention_heads=args.heads, joint_attention_dim=64,
        caption_projection_dim=64 * args.heads, pooled_projection_dim=64, pos_embed_max_size=res // args.patch_size)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=toy.identity_vae(), text_encoder=encoders[0], tokenizer=tokenizer,
                                    text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.eval().requires_grad_(False)
    return pipe


class Meter:
    """Hooks on transformers: forwards per adapter (label, t, batch, grad), time inside forward and
    backward (synchronised on CUDA), tokens, and FLOPs (2 N per token forward; 2 N more backward: the
    base is frozen, so only activation gradients, no weight gradients)."""

    def __init__(self, device, n_params, patch_size):
        self.device, self.n_params, self.patch = device, n_params, patch_size
        self.calls, self.inside, self.flops, self.tokens = [], 0.0, 0.0, 0
        self._t0 = self._b0 = None

    def now(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self):
        self.calls, self.inside, self.flops, self.tokens = [], 0.0, 0.0, 0
        return self.now()

    def attach(self, model, label=None):
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer
        lora = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)

        def pre(module, args, kwargs):
            self._t0 = self.now()

        def post(module, args, kwargs, out):
            self.inside += self.now() - self._t0
            name = label or ("base" if lora is None or lora.disable_adapters else lora.active_adapters[0])
            x, context = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            tokens = x.shape[0] * ((x.shape[-2] // self.patch) * (x.shape[-1] // self.patch) + context.shape[1])
            grad = torch.is_grad_enabled() and out[0].requires_grad
            self.calls.append((name, float(kwargs["timestep"][0]) / 1000, x.shape[0], grad))
            self.tokens += tokens
            self.flops += tokens * self.n_params * (4 if grad else 2)
            if grad:
                out[0].register_hook(self._backward_started)

        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(post, with_kwargs=True)

    def _backward_started(self, grad):
        from torch.autograd import Variable
        self._b0 = self.now()
        Variable._execution_engine.queue_callback(self._backward_done)  # runs when this backward pass ends
        return grad

    def _backward_done(self):
        self.inside += self.now() - self._b0

    def report(self, step_time):
        peak = next((v for k, v in PEAK_TFLOPS.items() if self.device.type == "cuda" and k in gpu_name()), None)
        return {"step_time": step_time, "inside_time": self.inside, "overhead_fraction": 1 - self.inside / step_time,
                "tokens_per_s": self.tokens / step_time, "forwards": len(self.calls),
                "mfu": self.flops / step_time / (peak * 1e12) if peak else None}


def gpu_name():
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else ""


def peak_memory_mb(device, baseline_kb):
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024


def trainable(transformer):
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # as the stages do: LoRA weights and Adam state in fp32
    return params


def random_lora(model, name, rank):
    """A LoRA adapter `name` with random B (a trained teacher's is not zero), the same for a given name
    whichever model it is added to, so the shared and the copies layouts compute the same losses."""
    import torch
    import common
    model.add_adapter(common.lora_config(rank, 2 * rank), name)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * (0.01 if "lora_B" in n else 1 / rank))


def attach_adapters(transformer, names, rank):
    """Ours: every teacher and the anchor an adapter on the (student's) base; returns opd.py's teacher_fn."""
    import common
    import opd
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    for name in names:
        random_lora(transformer, name, rank)
    for n, p in transformer.named_parameters():
        p.requires_grad_(n in trainable)  # peft's add_adapter made the new adapter trainable
    if "student" in transformer.peft_config:
        common.use_adapter(transformer, "student")
    return functools.partial(opd.teacher_velocities, transformer, {task: f"teacher_{task}" for task in TASKS}, "anchor")


def lora_state(model, name):
    """Adapter `name` in merge_loras' form: read_lora's keys, alpha / r folded into B."""
    from peft.utils import get_peft_model_state_dict
    import common
    state = {k: v.float().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    return common.fold_scale(state, model.peft_config[name].to_dict())


def copies_velocities(teacher_models, anchor_model, tasks, x, t, cond, uncond, cfg):
    """opd.teacher_velocities for the released layout: the same routing, each teacher its own model."""
    import torch
    import common
    with torch.no_grad():
        v_teacher = torch.empty(x.shape, device=x.device)
        for task, idx in common.route(tasks, teacher_models).items():  # (ROUTE)
            idx = idx.to(x.device)
            v_teacher[idx] = common.guided_velocity(teacher_models[task], x[idx], t, (cond[0][idx], cond[1][idx]),
                                                    (uncond[0][idx], uncond[1][idx]), cfg)
        return v_teacher, common.guided_velocity(anchor_model, x, t, cond, uncond, cfg)


def warm_up(pipe, prompts, max_seq, resolution, device):
    """One guided forward and backward of one sample: one-time costs (kernel selection, first allocations)."""
    import torch
    import common
    cond, uncond = common.encode_prompts(pipe, [prompts[0].text], max_seq, device)
    x = common.initial_latents(pipe, resolution, [torch.Generator().manual_seed(0)], device)
    v = common.guided_velocity(pipe.transformer, x, 0.5, cond, uncond, 4.5)
    if v.requires_grad:
        v.sum().backward()


def bench_teacher_calls(batch, meter):
    """The teacher calls of one state: batched per routed teacher (opd.py) vs one call per prompt."""
    teacher_fn, routed, x, t, cond, uncond = batch
    start = meter.now()
    teacher_fn(routed, x, t, cond, uncond)
    batched = meter.now() - start
    start = meter.now()
    for j in range(len(routed)):
        teacher_fn(routed[j:j + 1], x[j:j + 1], t, (cond[0][j:j + 1], cond[1][j:j + 1]),
                   (uncond[0][j:j + 1], uncond[1][j:j + 1]))
    return {"teacher_time_batched": batched, "teacher_time_per_prompt": meter.now() - start}


def bench_sampler(pipe, prompts, args, resolution, max_seq, t, device, meter):
    """common.rollout (ODE, with prompt encoding) vs StableDiffusion3Pipeline(output_type='latent')."""
    import common
    texts = [p.text for p in prompts for _ in range(args.group_size)]
    gens = common.sample_generators(0, 0, range(len(texts)))
    latents = common.initial_latents(pipe, resolution, gens, device)
    def theirs():
        return pipe(prompt=texts, negative_prompt=[""] * len(texts), latents=latents, num_inference_steps=args.steps,
                    guidance_scale=4.5, output_type="latent", max_sequence_length=max_seq).images

    def ours():
        cond, uncond = common.encode_prompts(pipe, texts, max_seq, device)
        return common.rollout(pipe.transformer, cond, uncond, latents, t, 4.5, 0.0).xs[:, -1]

    times, out = {theirs: [], ours: []}, {}
    for fn in (theirs, ours, ours, theirs):  # other jobs only ever add time: the faster of two runs each, ABBA
        start = meter.now()
        out[fn] = fn()
        times[fn].append(meter.now() - start)
    return {"ours_time": min(times[ours]), "diffusers_time": min(times[theirs]),
            "max_abs_diff": (out[ours].float() - out[theirs].float()).abs().max().item()}


@contextlib.contextmanager
def profiled(out, name, device):
    """torch.profiler around a block; its op table (by self time) is written to <out>/profile_<name>.txt."""
    import torch
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(os.path.join(out, f"profile_{name}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=30))


if __name__ == "__main__":
    main(parse_args())
