"""A world shaped like Stable Diffusion 3.5 Medium, with random weights, built offline.

    python sd35m_world.py --out /tmp/sd35m    # seconds: <out>/{model,data,teacher-<task>}

The toy world (toy.py) has no T5, no dual attention, no qk-norm and an identity VAE, so what is
specific to SD3.5-M is not exercised there. This world is: the same block types and config keys as
SD3.5-M (SD35M_TRANSFORMER, SD35M_VAE, below) with tiny widths (TINY_*), i.e. an
SD3Transformer2DModel whose first blocks also have the dual-attention `attn2`, rms_norm qk-norm,
patch 2, 16 latent channels; CLIP-L, CLIP-G and a T5 encoder with tokenizers written here
(character pieces, so any lowercase prompt encodes); and a 16-channel AutoencoderKL with SD3.5's
scaling and shift factors.

<out>/model is a diffusers folder that `StableDiffusion3Pipeline.from_pretrained` and every stage
load (no flow_opd.json: the stages use SD3.5-M's own defaults). <out>/teacher-<task> are LoRAs
saved exactly as the released Flow-GRPO teachers are: `peft.get_peft_model` with
`LoraConfig(r=32, lora_alpha=64, target_modules=[attn.*])`, then `save_pretrained` (a PEFT folder,
keys prefixed `base_model.model.`), with random B so that they change the model. <out>/data holds a
few prompts per task in Flow-GRPO's dataset/ layout.

build_pipeline(size="full") builds SD3.5-M's exact transformer and VAE (and text encoders of
SD3.5-M's widths) with random weights on a device, without writing them: runs/gpu_check.py.
"""
import argparse
import copy
import json
import os

import torch

# SD3.5-M's transformer, VAE and scheduler configs, as in its diffusers folder
SD35M_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}
SD35M_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": False,
    "use_post_quant_conv": False, "mid_block_add_attention": True}
SD35M_SHIFT = 3.0
# its text encoders' widths: CLIP-L, CLIP-G (bigG) and T5-XXL (v1.1)
SD35M_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
SD35M_CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}
SD35M_T5 = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
            "feed_forward_proj": "gated-gelu"}

# the same keys, tiny widths: 3 blocks, dual attention in blocks 0-1, 64 px by default, up to 512 px
TINY_TRANSFORMER = {**SD35M_TRANSFORMER, "sample_size": 8, "num_layers": 3, "attention_head_dim": 8,
                    "num_attention_heads": 2, "joint_attention_dim": 32,
                    "caption_projection_dim": 16, "pooled_projection_dim": 24,
                    "pos_embed_max_size": 32, "dual_attention_layers": [0, 1]}
TINY_VAE = {**SD35M_VAE, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
            "norm_num_groups": 4, "sample_size": 64}
TINY_CLIP_L = {**SD35M_CLIP_L, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
               "num_attention_heads": 2, "projection_dim": 8}
TINY_CLIP_G = {**SD35M_CLIP_G, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "projection_dim": 16}
TINY_T5 = {**SD35M_T5, "d_model": 32, "d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 1}
SIZES = {"tiny": (TINY_TRANSFORMER, TINY_VAE, TINY_CLIP_L, TINY_CLIP_G, TINY_T5),
         "full": (SD35M_TRANSFORMER, SD35M_VAE, SD35M_CLIP_L, SD35M_CLIP_G, SD35M_T5)}

# the released Flow-GRPO teachers' LoRA (r, alpha, target modules)
RELEASED_LORA = {"r": 32, "lora_alpha": 64, "init_lora_weights": "gaussian",
                 "target_modules": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
                                    "attn.to_add_out", "attn.to_k", "attn.to_out.0", "attn.to_q",
                                    "attn.to_v"]}
TEACHERS = ("geneval", "ocr", "pickscore")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789\"'.,:;!?-"
CLIP_TOKENS = 77
T5_TOKENS = 512  # SD3's T5 tokenizer limit (model_max_length)
PROMPTS = {
    "geneval": [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}],
         "prompt": "a photo of a cat"},
        {"tag": "counting", "include": [{"class": "dog", "count": 2}],
         "prompt": "a photo of two dogs"},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
         "prompt": "a photo of a red car"}],
    "ocr": ['a sign that says "open"', 'a poster that reads "flow 2026"',
            'a label that shows "tea"'],
    "pickscore": ["a lighthouse at dusk, highly detailed", "a bowl of ramen, studio light",
                  "a fox in the snow"]}


def write_tokenizers(folder):
    """A CLIP and a T5 tokenizer over single characters, written to <folder>/{clip,t5}."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTokenizer, T5TokenizerFast
    os.makedirs(os.path.join(folder, "clip"), exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with open(os.path.join(folder, "clip", "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "clip", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    clip = CLIPTokenizer(os.path.join(folder, "clip", "vocab.json"),
                         os.path.join(folder, "clip", "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=CLIP_TOKENS)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARS] + [("\u2581" + c, -2.5) for c in CHARS]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    unigram.normalizer = normalizers.Lowercase()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    unigram.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=unigram, eos_token="</s>", unk_token="<unk>",
                         pad_token="<pad>", extra_ids=0, model_max_length=T5_TOKENS)
    t5.save_pretrained(os.path.join(folder, "t5"))
    return clip, t5


def build_pipeline(size="tiny", tokenizer_dir=None, seed=0, device="cpu", dtype=torch.float32):
    """A StableDiffusion3Pipeline of SD3.5-M's shape with random weights, built on `device` in
    `dtype` (the VAE in fp32, as the stages keep it). size: 'tiny' or 'full' (SD3.5-M's widths)."""
    import tempfile
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    transformer_config, vae_config, clip_l, clip_g, t5_config = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok, t5_tok = write_tokenizers(tokenizer_dir or tmp)
    torch.manual_seed(seed)
    special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
               "max_position_embeddings": CLIP_TOKENS}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # parameters made where they live: SD3.5-M's size, fast on a GPU
            encoders = [CLIPTextModelWithProjection(
                CLIPTextConfig(vocab_size=len(clip_tok), **special, **c)) for c in (clip_l, clip_g)]
            t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), decoder_start_token_id=0,
                                         pad_token_id=0, eos_token_id=1, **t5_config))
            transformer = SD3Transformer2DModel(**transformer_config)
            vae = AutoencoderKL(**vae_config).float()
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SD35M_SHIFT)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=encoders[0], tokenizer=clip_tok,
                                    text_encoder_2=encoders[1], tokenizer_2=clip_tok,
                                    text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.set_progress_bar_config(disable=True)
    for part in (transformer, vae, t5, *encoders):
        part.eval().requires_grad_(False)
    return pipe


def write_teacher(transformer, folder, seed, scale=0.1):
    """A LoRA saved as the released Flow-GRPO teachers are (peft.get_peft_model + save_pretrained:
    a PEFT folder), with random B (a fresh LoRA's B is 0) drawn from `seed`."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(transformer), LoraConfig(**RELEASED_LORA))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def write_data(root):
    """A few prompts per task in Flow-GRPO's dataset/ layout (the same prompts in both splits)."""
    for task, prompts in PROMPTS.items():
        os.makedirs(os.path.join(root, task), exist_ok=True)
        for split in ("train", "test"):
            if task == "geneval":
                with open(os.path.join(root, task, f"{split}_metadata.jsonl"), "w") as f:
                    f.writelines(json.dumps(row) + "\n" for row in prompts)
            else:
                with open(os.path.join(root, task, f"{split}.txt"), "w") as f:
                    f.writelines(p + "\n" for p in prompts)
    return root


def build(out, seed=0, teachers=TEACHERS):
    """<out>/model (a tiny SD3.5-M-shaped diffusers folder), <out>/data and <out>/teacher-<task>
    (released format); returns {"model", "data", "teacher-<task>": path}."""
    pipe = build_pipeline("tiny", seed=seed)
    paths = {"model": os.path.join(out, "model"), "data": write_data(os.path.join(out, "data"))}
    pipe.save_pretrained(paths["model"])
    for k, task in enumerate(teachers):
        folder = os.path.join(out, f"teacher-{task}")
        paths[f"teacher-{task}"] = write_teacher(pipe.transformer, folder, seed + 1 + k)
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of model/, data/ and teacher-<task>/")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    for name, path in build(args.out, args.seed).items():
        print(f"{name}: {path}")
