"""The SD3.5-M-shaped world (sd35m_world.py): dual attention, qk-norm, T5, a 16-channel KL VAE and
teachers in the released PEFT format. Rollout, decode and prompt encoding equal the pipeline's own;
chunked sampling equals unchunked; every stage runs end to end under bf16 with the released
precision rule (frozen parts bf16, VAE and trained LoRA fp32); a LoRA trained here targets the
released teachers' modules and merges with them; the released defaults (128 T5 tokens, the
scheduler's shift); runs/gpu_check.py on the tiny widths."""
import copy
import json
import os

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

import cold_start
import common
import evaluate
import opd
import sd35m_world
import teacher_grpo
from conftest import ROOT

RES = ["--resolution", "64"]
BF16 = ["--mixed-precision", "bf16", "--threads", "1", "--device", "cpu"]
BARE = [t.split("attn.")[1] for t in common.LORA_TARGETS]  # the suffixes used before: attn2 too


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{model, data, teacher-geneval, teacher-ocr, teacher-pickscore}: paths of a fresh world."""
    return sd35m_world.build(str(tmp_path_factory.mktemp("sd35m")))


@pytest.fixture(scope="module")
def pipe(world):
    return common.load_pipeline(world["model"])


def lora_modules(transformer):
    return sorted(n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer))


def released_modules(path):
    state, config = common.read_lora(path)
    return sorted({k.rsplit(".lora_", 1)[0] for k in state}), config


def add_by_hand(transformer, loras):
    """A copy of transformer with w (alpha / r) B A added to the adapted weights, for each
    (w, path) of loras."""
    reference = copy.deepcopy(transformer)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for w, path in loras:
            state, config = common.read_lora(path)
            for key in (k for k in state if k.endswith(".lora_A.weight")):
                m = key[:-len(".lora_A.weight")]
                delta = state[f"{m}.lora_B.weight"] @ state[key]
                modules[m].weight += w * common.lora_scale(config) * delta
    return reference


# ------------------------------------------------------------------------- shape and formats

def test_the_world_has_sd35m_block_types_and_config_keys(world, pipe):
    tr, vae = pipe.transformer, pipe.vae
    assert set(sd35m_world.TINY_TRANSFORMER) == set(sd35m_world.SD35M_TRANSFORMER)
    assert set(sd35m_world.TINY_VAE) == set(sd35m_world.SD35M_VAE)
    assert [b.attn2 is not None for b in tr.transformer_blocks] == [True, True, False]
    assert type(tr.transformer_blocks[0].attn.norm_q).__name__ == "RMSNorm"
    assert (tr.config.patch_size, tr.config.in_channels, vae.config.latent_channels) == (2, 16, 16)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.vae_scale_factor == 8 and type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    assert not os.path.exists(os.path.join(world["model"], "flow_opd.json"))  # SD3.5-M's defaults


def test_released_targets_select_the_released_teachers_modules(world, pipe):
    """23 modules on this model (8 per dual block's attn, 7 in the last block); the bare suffixes
    used before also matched the 8 attn2 projections (31); on SD3.5-M 191 vs 243."""
    modules, config = released_modules(world["teacher-ocr"])
    assert config["r"] == 32 and config["lora_alpha"] == 64 and len(modules) == 23
    assert not any(".attn2." in m for m in modules)
    fresh, bare = copy.deepcopy(pipe.transformer), copy.deepcopy(pipe.transformer)
    fresh.add_adapter(common.lora_config(4, 8), "new")
    assert lora_modules(fresh) == modules
    bare.add_adapter(common.lora_config(4, 8, BARE), "old")
    assert len(lora_modules(bare)) == 31 and sum(".attn2." in m for m in lora_modules(bare)) == 8


def test_released_format_teacher_loads_at_its_scale(world, pipe):
    """Adapter output = the base with (alpha / r) B A added to each weight by hand."""
    reference = add_by_hand(pipe.transformer, [(1.0, world["teacher-geneval"])])
    student = copy.deepcopy(pipe.transformer)
    common.load_lora(student, world["teacher-geneval"], "teacher")
    cond, _ = common.encode_prompts(pipe, ["a photo of a cat"], 128)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = common.velocity(pipe.transformer, x, 0.7, *cond)
        expected = common.velocity(reference, x, 0.7, *cond)
        loaded = common.velocity(student, x, 0.7, *cond)
    assert (base - expected).abs().max() > 1e-2
    assert torch.allclose(loaded, expected, atol=1e-5)


# ------------------------------------------------------------------------- the pipeline's own

def test_encode_rollout_and_decode_equal_the_pipeline(pipe):
    texts = ['a sign that says "open"', "a fox in the snow"]
    cond, uncond = common.encode_prompts(pipe, texts, 128)
    theirs = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None,
                                negative_prompt=[""] * 2, max_sequence_length=128)
    assert cond[0].shape == (2, 77 + 128, 32)
    for a, b in zip([cond[0], uncond[0], cond[1], uncond[1]], theirs):
        assert torch.equal(a, b)
    latents = common.initial_latents(pipe, 64, common.sample_generators(0, 0, [0, 1]), "cpu")
    run = dict(prompt=texts, num_inference_steps=4, guidance_scale=4.5, height=64, width=64,
               max_sequence_length=128)
    images = pipe(latents=latents.clone(), output_type="pt", **run).images
    final = pipe(latents=latents.clone(), output_type="latent", **run).images
    t = common.timesteps(4)
    x = common.rollout(pipe.transformer, cond, uncond, latents, t, 4.5, 0.0).xs[:, -1]
    assert torch.equal(x, final)
    assert torch.equal(common.decode(pipe, x), images)


def test_chunked_sampling_and_decoding_equal_one_batch(pipe):
    """--sample-batch bounds memory only: rollouts, log-probs and images are unchanged (bit for bit
    on chunks of 2 or more; a chunk of one sample takes other CPU kernels, equal to rounding). The
    group reuses its prompt's embeddings, equal to encoding each sample's prompt on its own row."""
    texts = ['a sign that says "open"', 'a label that shows "tea"']
    prompts = [common.Prompt(text, "ocr", {}) for text in texts]
    out = {}
    for chunk in (1, 2, 3, 8):
        args = teacher_grpo.parse_args(["--batch-size", "2", "--group-size", "4", "--steps", "3",
                                        "--resolution", "64", "--max-sequence-length", "128",
                                        "--sample-batch", str(chunk)])
        args.mixed_precision = "fp32"
        out[chunk] = common.on_policy_rollouts(pipe, prompts, args, 0, slice(0, 8), 4.5,
                                               torch.device("cpu"), common.timesteps(3))
    mine, cond, uncond, xs, log_probs = out[8]
    for chunk in (1, 2, 3):
        assert [p.text for p in out[chunk][0]] == [p.text for p in mine]
    for chunk in (2, 3):
        assert torch.equal(out[chunk][3], xs) and torch.equal(out[chunk][4], log_probs)
    assert torch.allclose(out[1][3], xs, atol=1e-5)
    assert torch.allclose(out[1][4], log_probs, atol=1e-6)
    per_sample, _ = common.encode_prompts(pipe, [p.text for p in mine], 128)
    assert torch.allclose(cond[0], per_sample[0], atol=1e-6)
    assert torch.allclose(cond[1], per_sample[1], atol=1e-6)
    assert sorted(p.text for p in mine) == sorted(texts * 4)
    whole = common.decode(pipe, xs[:, -1])
    assert torch.equal(common.decode(pipe, xs[:, -1], 3), whole) and whole.shape == (8, 3, 64, 64)
    assert torch.allclose(common.decode(pipe, xs[:, -1], 1), whole, atol=1e-5)


# ------------------------------------------------------------------------- every stage, bf16

class DtypeSpy:
    """Records the dtypes a stage runs with: each component's weights, what it computes in (the
    output dtype of its last layer), the LoRA adapters' weights, and the optimizer's parameters
    and state."""

    def __init__(self, monkeypatch):
        self.computed, self.adapters, self.optimizers, self.pipe = {}, {}, [], None
        load, spy = common.load_stage_pipeline, self

        def load_and_watch(args, device):
            spy.pipe = load(args, device)
            spy.watch(spy.pipe)
            return spy.pipe

        class AdamW(torch.optim.AdamW):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                spy.optimizers.append(self)

        monkeypatch.setattr(common, "load_stage_pipeline", load_and_watch)
        monkeypatch.setattr(torch.optim, "AdamW", AdamW)

    def watch(self, pipe):
        def record(name):
            def hook(module, args, out):
                self.computed.setdefault(name, out.dtype)  # returns None: the output is kept
            return hook
        pipe.transformer.proj_out.register_forward_hook(record("transformer"))
        pipe.text_encoder.text_projection.register_forward_hook(record("CLIP"))
        pipe.text_encoder_3.encoder.final_layer_norm.register_forward_hook(record("T5"))
        pipe.vae.decoder.conv_out.register_forward_hook(record("VAE decode"))

        def adapters(module, args):
            for n, p in module.named_parameters():
                if ".lora_" in n:
                    self.adapters.setdefault(n.split(".lora_")[1].split(".")[1], p.dtype)
        pipe.transformer.register_forward_pre_hook(adapters)

    def table(self, trained=None):
        """{component: dtype name} of what the stage ran."""
        def name(dtype):
            return str(dtype).replace("torch.", "")
        pipe = self.pipe
        base = {n: p for n, p in pipe.transformer.named_parameters() if ".lora_" not in n}
        frozen = sorted({name(d) for a, d in self.adapters.items() if a != trained})
        row = {"transformer weights": name(base["proj_out.weight"].dtype),
               "transformer compute": name(self.computed["transformer"]),
               "CLIP-L/G weights": name(pipe.text_encoder_2.text_projection.weight.dtype),
               "CLIP compute": name(self.computed["CLIP"]),
               "T5 weights": name(pipe.text_encoder_3.shared.weight.dtype),
               "T5 compute": name(self.computed["T5"]),
               "VAE weights": name(pipe.vae.decoder.conv_out.weight.dtype),
               "VAE decode": name(self.computed.get("VAE decode", "-")),
               "frozen adapters": frozen or ["-"]}
        if trained:
            optimizer = self.optimizers[-1]
            params = [p for g in optimizer.param_groups for p in g["params"]]
            state = [v for s in optimizer.state.values() for v in s.values()
                     if torch.is_tensor(v) and v.dim()]
            row.update({"trained LoRA": name(self.adapters[trained]),
                        "optimizer params": sorted({name(p.dtype) for p in params}),
                        "optimizer state": sorted({name(v.dtype) for v in state})})
        return row


RELEASED_RULE = {"transformer weights": "bfloat16", "transformer compute": "bfloat16",
                 "CLIP-L/G weights": "bfloat16", "CLIP compute": "bfloat16",
                 "T5 weights": "bfloat16", "T5 compute": "bfloat16",
                 "VAE weights": "float32", "VAE decode": "float32"}
TRAINED_RULE = {"trained LoRA": "float32", "optimizer params": ["float32"],
                "optimizer state": ["float32"]}


def teachers_flag(world):
    return ",".join(f"{t}={world['teacher-' + t]}" for t in sd35m_world.TEACHERS)


@pytest.fixture(scope="module")
def grpo_run(world, tmp_path_factory):
    """teacher_grpo.py, 2 steps under bf16: (out folder, dtype table)."""
    out = str(tmp_path_factory.mktemp("grpo") / "out")
    with pytest.MonkeyPatch.context() as mp:
        spy = DtypeSpy(mp)
        teacher_grpo.main(teacher_grpo.parse_args(
            ["--model", world["model"], "--data-root", world["data"], "--tasks", "ocr",
             "--reward", "jpeg", "--batch-size", "2", "--group-size", "2", "--steps", "2",
             "--micro-batch", "4", "--max-steps", "2", "--save-every", "2", "--eval-every", "2",
             "--out", out, *RES, *BF16]))
        return out, spy.table("policy")


def test_grpo_lora_targets_the_released_modules_under_the_precision_rule(world, grpo_run):
    out, table = grpo_run
    assert table == {**RELEASED_RULE, **TRAINED_RULE, "frozen adapters": ["-"]}
    trained, config = released_modules(os.path.join(out, "final"))
    assert trained == released_modules(world["teacher-ocr"])[0]
    assert sorted(config["target_modules"]) == sorted(sd35m_world.RELEASED_LORA["target_modules"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["kl"] > 0
    assert os.path.isfile(os.path.join(out, "grids", "step-00002.png"))


def test_merge_of_a_released_teacher_and_one_trained_here_loads_in_the_pipeline(
        world, grpo_run, pipe, tmp_path):
    trained = os.path.join(grpo_run[0], "final")
    cold_start.main(cold_start.parse_args(
        ["--init", "merge", "--teachers", f"geneval={world['teacher-geneval']},deqa={trained}",
         "--out", str(tmp_path)]))
    reference = add_by_hand(pipe.transformer, [(0.5, world["teacher-geneval"]), (0.5, trained)])
    loaded = copy.deepcopy(pipe)
    loaded.load_lora_weights(os.path.join(tmp_path, "final"))
    assert lora_modules(loaded.transformer) == released_modules(world["teacher-ocr"])[0]
    cond, _ = common.encode_prompts(pipe, ["a photo of two dogs", "a fox in the snow"], 128)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = common.velocity(reference, x, 0.4, *cond)
        ours = common.velocity(loaded.transformer, x, 0.4, *cond)
        base = common.velocity(pipe.transformer, x, 0.4, *cond)
    assert (base - expected).abs().max() > 1e-2 and torch.allclose(ours, expected, atol=1e-5)


def test_merge_of_teachers_on_other_modules_names_both_sets(world, pipe, tmp_path):
    """A LoRA on the bare suffixes (attn2 included) does not merge with a released teacher."""
    tr = copy.deepcopy(pipe.transformer)
    tr.add_adapter(common.lora_config(4, 8, BARE), "bare")
    common.save_lora(tr, "bare", str(tmp_path / "bare"))
    teachers = f"geneval={world['teacher-geneval']},ocr={tmp_path / 'bare'}"
    with pytest.raises(ValueError, match=r"target different modules: only 'geneval' has \[\], "
                                         r"only 'ocr' has \['transformer_blocks.0.attn2.to_k'"):
        cold_start.main(cold_start.parse_args(["--init", "merge", "--teachers", teachers,
                                               "--out", str(tmp_path / "out")]))


def test_opd_runs_under_the_precision_rule(world, grpo_run, tmp_path, monkeypatch):
    spy = DtypeSpy(monkeypatch)
    opd.main(opd.parse_args(
        ["--model", world["model"], "--data-root", world["data"],
         "--teachers", teachers_flag(world), "--mar-teacher", os.path.join(grpo_run[0], "final"),
         "--init", "merge", "--batch-size", "3", "--group-size", "2", "--steps", "2",
         "--micro-batch", "6", "--max-steps", "1", "--eval-every", "0", "--out", str(tmp_path),
         *RES, *BF16]))
    assert spy.table("student") == {**RELEASED_RULE, **TRAINED_RULE,
                                    "VAE decode": "-",  # OPD decodes nothing without grids
                                    "frozen adapters": ["bfloat16"]}
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    kls = [k for k in row if k.startswith("kl/")]
    assert row["mar_kl"] > 0 and kls and set(kls) <= {"kl/geneval", "kl/ocr", "kl/pickscore"}


def test_sft_runs_under_the_precision_rule(world, tmp_path, monkeypatch):
    spy = DtypeSpy(monkeypatch)
    cold_start.main(cold_start.parse_args(
        ["--init", "sft", "--model", world["model"], "--data-root", world["data"],
         "--teachers", teachers_flag(world), "--max-prompts", "1", "--steps", "2",
         "--batch-size", "2", "--max-steps", "1", "--rank", "4", "--alpha", "8",
         "--out", str(tmp_path), *RES, *BF16]))
    expected = {**RELEASED_RULE, **TRAINED_RULE, "frozen adapters": ["bfloat16"]}
    assert spy.table("student") == expected
    modules, _ = released_modules(str(tmp_path / "final"))
    assert modules == released_modules(world["teacher-ocr"])[0]


def test_evaluate_runs_under_the_precision_rule(world, tmp_path, monkeypatch):
    spy = DtypeSpy(monkeypatch)
    row = evaluate.main(evaluate.parse_args(
        ["--model", world["model"], "--data-root", world["data"],
         "--adapters", world["teacher-ocr"], "--tasks", "ocr", "--metrics", "ocr=jpeg,deqa=none",
         "--steps", "2", "--limit", "2", "--grid", "0", "--out", str(tmp_path), *RES, *BF16]))
    assert spy.table() == {**RELEASED_RULE, "frozen adapters": ["bfloat16"]}
    assert row["n"]["ocr"] == 2


# ------------------------------------------------------------------------- defaults, bad input

@pytest.mark.parametrize("stage", [teacher_grpo, opd, evaluate])
def test_released_defaults_128_tokens_and_the_schedulers_shift(world, stage):
    args = common.resolve_model_args(stage.parse_args(["--model", world["model"]]))
    assert (args.max_sequence_length, args.shift, args.resolution) == (128, 3.0, 512)


@pytest.mark.parametrize("flags,message", [
    (["--max-sequence-length", "513"], "--max-sequence-length 513 is above the T5 tokenizer's "
                                       "limit of 512"),
    (["--mixed-precision", "fp16"], "--mixed-precision fp16 does not run on the CPU"),
    (["--lora-targets", "to_nothing"], "to_nothing"),
])
def test_bad_input_fails_with_a_clear_message(world, tmp_path, flags, message):
    args = teacher_grpo.parse_args(
        ["--model", world["model"], "--data-root", world["data"], "--tasks", "ocr",
         "--reward", "jpeg", "--batch-size", "1", "--group-size", "2", "--steps", "1",
         "--max-steps", "1", "--out", str(tmp_path / "out"), *RES, "--device", "cpu", *flags])
    with pytest.raises(ValueError, match=message):
        teacher_grpo.main(args)


def test_fp32_on_cpu_and_fp16_on_cuda_by_default():
    assert common.resolve_precision(None, "cpu") == "fp32"
    assert common.resolve_precision(None, torch.device("cuda", 0)) == "fp16"
    assert common.weight_dtype("fp16") == torch.float16
    assert common.weight_dtype("fp32") == torch.float32


def test_gpu_check_runs_a_grpo_and_an_opd_step_on_the_tiny_world(tmp_path):
    """runs/gpu_check.py as on a GPU, but with the tiny widths on the CPU: what a step ran."""
    import importlib.util
    path = os.path.join(ROOT, "runs", "gpu_check.py")
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    flags = ["--size", "tiny", "--device", "cpu", "--group-size", "2", "--steps", "3",
             "--out", str(tmp_path)]
    grpo = gpu_check.main(gpu_check.parse_args(["--step", "grpo", *flags]))
    result = gpu_check.main(gpu_check.parse_args(["--step", "opd", *flags]))
    for r in (grpo, result):
        assert (r["samples"], r["dtype"], r["mfu"]) == (6, "bf16", None) and r["step_time"] > 0
        saved = json.loads((tmp_path / f"gpu_check_{r['step_name']}.json").read_text())
        assert saved["step_time"] == r["step_time"]
    # rollout: 3 steps of one chunk of 6; 2 trained steps x 2 updates of 3: policy and KL reference
    assert grpo["forwards"] == 3 + 2 * 2 * 2
    # OPD: the same rollout, then per update and trained step the student, the anchor and each
    # routed teacher
    assert result["anchor_forwards"] == 4 and 4 <= result["teacher_forwards"] <= 12
    assert result["forwards"] == 3 + 4 + 4 + result["teacher_forwards"]
