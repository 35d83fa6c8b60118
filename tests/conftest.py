"""Shared fixtures: a tiny randomly initialised SD3 pipeline built locally (no hub), as diffusers' own tests do."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FLOW_GRPO_DATA = os.path.join(ROOT, "tests", "data", "flow_grpo")  # a few real lines, MIT

torch.set_num_threads(1)  # 2-core machines: oversubscribed threads are many times slower


def write_char_tokenizer(folder, words=("a", "red", "blue", "cat", "dog", "sign", "says")):
    """A CLIPTokenizer over single characters (no merges): enough for tiny text encoders."""
    from transformers import CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789\"'.,"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)


def build_tiny_pipeline(folder, seed=0):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    tokenizer = write_char_tokenizer(os.path.join(folder, "_tok"))
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, projection_dim=16, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, scaling_factor=1.0, shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
                                    text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    with open(os.path.join(folder, "flow_opd.json"), "w") as f:
        json.dump({"max_sequence_length": 1, "resolution": 8}, f)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny SD3 pipeline folder (8x8 latents, 2 layers, no T5)."""
    return build_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    import common
    return common.load_pipeline(tiny_model)


def write_distill_world(tiny_model, root):
    """Under root (a pathlib.Path): a data root with two tasks (ocr, pickscore) in Flow-GRPO's layout and
    three random LoRAs of the tiny model (the ocr and pickscore teachers, a MAR anchor); returns root."""
    import common
    for task, lines in {"ocr": ['a sign that says "ab"', 'a sign that says "cd"'], "pickscore": ["a cat", "a dog"]}.items():
        (root / "data" / task).mkdir(parents=True)
        for split in ("train", "test"):
            (root / "data" / task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    tr = common.load_pipeline(tiny_model).transformer
    g = torch.Generator().manual_seed(0)
    for name in ("ocr", "pickscore", "anchor"):
        tr.add_adapter(common.lora_config(4, 8), name)
        with torch.no_grad():
            for n, p in tr.named_parameters():
                if f".{name}." in n and "lora_B" in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        common.save_lora(tr, name, str(root / name))
    return root
