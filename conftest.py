"""Tiny random-config models, built in code and saved as ordinary diffusers / transformers directories.

Nothing can be downloaded here, so every test model is made from a config, save_pretrained'ed
to a temp dir and loaded back through the project's real from_pretrained code.
"""
import json

import pytest
import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen's pre-tokenizer split: a newline is its own piece, so nothing merges across the assistant header.
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# a Qwen3-style template (single turns; enable_thinking=False adds the empty think block like Qwen3)
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
CORPUS = ["Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
          "of the objects and background:", "system\n user\n assistant\n",
          "a photo of a cat dog red blue green dance monkey bad quality hello world circle square triangle"] * 20


def bpe_tokenizer(special=SPECIAL, template=QWEN3_TEMPLATE, extra_corpus=(), vocab_size=400):
    """A byte-level BPE trained in-process, wrapped as transformers' Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    t = Tokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.train_from_iterator(list(CORPUS) + list(extra_corpus), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    m = json.loads(t.to_str())['model']
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(' ')) for x in m['merges']]
    return Qwen2Tokenizer(vocab=m['vocab'], merges=merges, additional_special_tokens=list(special[1:]),
                          chat_template=template)


def zimage_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model
    torch.manual_seed(0)
    tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                                  n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                                  cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
                                  axes_lens=[256, 32, 32])
    with torch.no_grad():                                    # pad tokens start as torch.empty
        tr.x_pad_token.normal_()
        tr.cap_pad_token.normal_()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D'] * 2,
                        up_block_types=['UpDecoderBlock2D'] * 2, block_out_channels=[32, 64], layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159)
    te = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)).eval()
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(transformer=tr, vae=vae, scheduler=sch, text_encoder=te, tokenizer=bpe_tokenizer())


def qwenimage_pipeline():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                     num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
                                     axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.5, 2.0, 1.0])
    sch = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                                          num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                                          time_shift_type='exponential', use_dynamic_shifting=True)
    cfg = Qwen2_5_VLConfig(text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, vocab_size=512,
                                            rope_scaling={'mrope_section': [1, 1, 2], 'rope_type': 'default',
                                                          'type': 'default'}, rope_theta=1000000.0),
                           vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2,
                                              out_hidden_size=16),
                           hidden_size=16, vocab_size=512, vision_end_token_id=151653, vision_start_token_id=151652,
                           vision_token_id=151654)
    te = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    return QwenImagePipeline(transformer=tr, vae=vae, scheduler=sch, text_encoder=te, tokenizer=bpe_tokenizer())


BUILDERS = {'zimage': zimage_pipeline, 'qwenimage': qwenimage_pipeline}


@pytest.fixture(scope='session')
def t2i_dir(tmp_path_factory):
    """family -> path of a saved tiny diffusers pipeline (built once per session)."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            BUILDERS[family]().save_pretrained(d)
            cache[family] = str(d)
        return cache[family]
    return get
