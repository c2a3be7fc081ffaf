"""Tiny random-config models, built in code and saved as ordinary diffusers / transformers directories.

Nothing can be downloaded here, so every test model is made from a config, save_pretrained'ed
to a temp dir and loaded back through the project's real from_pretrained code.
"""

import pytest
import torch

from toy import SPECIAL, bpe_tokenizer, vl_template

CORPUS = ["Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
          "of the objects and background:", "system\n user\n assistant\n",
          "a photo of a cat dog red blue green dance monkey bad quality hello world circle square triangle"] * 20


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
    return ZImagePipeline(transformer=tr, vae=vae, scheduler=sch, text_encoder=te, tokenizer=bpe_tokenizer(CORPUS))


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
    return QwenImagePipeline(transformer=tr, vae=vae, scheduler=sch, text_encoder=te, tokenizer=bpe_tokenizer(CORPUS))




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


# -----------------------------------------------------------------------------
# tiny VLMs (Qwen3-VL, Qwen2.5-VL) with an image-only processor

def vlm_tokenizer(family='qwen3', template=None, extra_corpus=(), vocab_size=400):
    """A small BPE with the Qwen-VL special tokens and chat template -> (tokenizer, special token ids)."""
    tok = bpe_tokenizer(CORPUS + list(extra_corpus), vocab_size, template or vl_template(
        system=None if family == 'qwen3' else 'You are a helpful assistant.'))
    return tok, {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}


def vlm_processor(family, tok):
    """The image-only processor (no torchvision) of a Qwen3-VL (patch 16) or Qwen2.5-VL (patch 14)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor
    import reward
    cls, patch, mean = (Qwen3VLProcessor, 16, [0.5] * 3) if family == 'qwen3' else (Qwen2_5_VLProcessor, 14, None)
    ip = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                  size={'shortest_edge': 32 * 32, 'longest_edge': 256 * 256},
                                  **({'image_mean': mean, 'image_std': mean} if mean else {}))
    return reward.image_only_processor(cls, ip, tok, tok.chat_template)


def qwen3vl_config(ids, vocab_size, text, vision):
    """A Qwen3VLConfig of the given text / vision sizes, wired to the tokenizer's special token ids."""
    from transformers import Qwen3VLConfig
    return Qwen3VLConfig(
        text_config=dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=None, eos_token_id=ids['<|im_end|>'],
                         **text),
        vision_config=vision, image_token_id=ids['<|image_pad|>'], video_token_id=ids['<|video_pad|>'],
        bos_token_id=None, eos_token_id=ids['<|im_end|>'], vision_start_token_id=ids['<|vision_start|>'],
        vision_end_token_id=ids['<|vision_end|>'])


def vlm_components(family='qwen3', template=None, extra_corpus=(), vocab_size=400, hidden=32, layers=2, seed=0):
    """(model, processor) of a tiny random Qwen3-VL or Qwen2.5-VL."""
    tok, ids = vlm_tokenizer(family, template, extra_corpus, vocab_size)
    torch.manual_seed(seed)
    if family == 'qwen3':
        from transformers import Qwen3VLForConditionalGeneration
        cfg = qwen3vl_config(
            ids, len(tok),
            text=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0, 'mrope_section': [2, 3, 3],
                                       'mrope_interleaved': True}),
            vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                        deepstack_visual_indexes=[1]))
        model = Qwen3VLForConditionalGeneration(cfg)
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        cfg = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=4096, pad_token_id=0, bos_token_id=None,
                             eos_token_id=ids['<|im_end|>'], rope_scaling={'mrope_section': [2, 3, 3], 'rope_type': 'default', 'type': 'default'}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[1]),
            image_token_id=ids['<|image_pad|>'], video_token_id=ids['<|video_pad|>'], bos_token_id=None,
            eos_token_id=ids['<|im_end|>'], vision_start_token_id=ids['<|vision_start|>'],
            vision_end_token_id=ids['<|vision_end|>'])
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    return model.eval(), vlm_processor(family, tok)


# -----------------------------------------------------------------------------
# tiny VLMs of other families (LLaVA, Gemma 3): SentencePiece-style tokenizers, where a label after
# "ASSISTANT: " is not the label tokenized alone ("ASSISTANT: a" -> "▁a")

LLAVA_TEMPLATE = (  # LLaVA-1.5 style: "USER: <image>\nq ASSISTANT: answer</s>"
    "{%- for m in messages %}{{- 'USER: ' if m['role'] == 'user' else 'ASSISTANT: ' }}"
    "{%- for c in m['content'] %}{%- if c['type'] == 'image' %}{{- '<image>\\n' }}{%- else %}{{- c['text'] }}{%- endif %}"
    "{%- endfor %}{{- ' ' if m['role'] == 'user' else '</s>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT: ' }}{%- endif %}")
GEMMA3_TEMPLATE = (  # Gemma 3 style: "<bos><start_of_turn>user\n<start_of_image>q<end_of_turn>\n<start_of_turn>model\n"
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{%- for c in m['content'] %}{%- if c['type'] == 'image' %}{{- '<start_of_image>' }}{%- else %}{{- c['text'] }}"
    "{%- endif %}{%- endfor %}{{- '<end_of_turn>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}")


def sp_tokenizer(special, template, vocab_size=300, **named):
    """A BPE over Metaspace pieces ("▁word", SentencePiece style) that adds its BOS, as Llama's and Gemma's do,
    wrapped as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE(unk_token='<unk>'))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='first')
    t.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='first')
    corpus = [c + ' USER: ASSISTANT: user model\n\n' for c in CORPUS]
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<unk>', '<pad>'] + special,
                                                      show_progress=False))
    bos = named['bos_token']
    t.post_processor = processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A $B',
                                                     special_tokens=[(bos, t.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token='<unk>', pad_token='<pad>', chat_template=template,
                                   **named)


def other_vlm_components(family, seed=0):
    """(model, processor) of a tiny random LLaVA or Gemma 3 (with a final logit soft cap)."""
    from transformers import LlamaConfig
    torch.manual_seed(seed)
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=512)
    if family == 'llava':
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        tok = sp_tokenizer(['<s>', '</s>', '<image>'], LLAVA_TEMPLATE, bos_token='<s>', eos_token='</s>',
                           extra_special_tokens={'image_token': '<image>'})
        ids = {t: tok.convert_tokens_to_ids(t) for t in ('<s>', '</s>', '<image>', '<pad>')}
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=2, image_size=32, patch_size=8),
                          text_config=LlamaConfig(**text, pad_token_id=ids['<pad>'], bos_token_id=ids['<s>'],
                                                  eos_token_id=ids['</s>']),
                          image_token_id=ids['<image>'], vision_feature_select_strategy='default', vision_feature_layer=-1)
        ip = CLIPImageProcessorPil(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
        return LlavaForConditionalGeneration(cfg).eval(), LlavaProcessor(
            image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy='default',
            num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    special = ['<bos>', '<eos>', '<start_of_turn>', '<end_of_turn>', '<start_of_image>', '<end_of_image>',
               '<image_soft_token>']
    tok = sp_tokenizer(special, GEMMA3_TEMPLATE, bos_token='<bos>', eos_token='<eos>', extra_special_tokens={
        'boi_token': '<start_of_image>', 'eoi_token': '<end_of_image>', 'image_token': '<image_soft_token>'})
    ids = {t: tok.convert_tokens_to_ids(t) for t in special + ['<pad>']}
    cfg = Gemma3Config(text_config=dict(text, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                        final_logit_softcapping=30.0, pad_token_id=ids['<pad>'],
                                        bos_token_id=ids['<bos>'], eos_token_id=ids['<eos>']),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=32, patch_size=8),
                       mm_tokens_per_image=4, boi_token_index=ids['<start_of_image>'],
                       eoi_token_index=ids['<end_of_image>'], image_token_index=ids['<image_soft_token>'])
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():                                        # logits of +-100: the soft cap would show (Gemma 3's
        model.lm_head.weight.mul_(300.0)                         # VLM forward does not apply it, so neither may we)
    return model, Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={'height': 32, 'width': 32}), tokenizer=tok, image_seq_length=4,
        chat_template=GEMMA3_TEMPLATE)


@pytest.fixture(scope='session')
def vlm_dir(tmp_path_factory):
    """family -> path of a saved tiny VLM (model + processor files), built once per session."""
    cache = {}

    def get(family='qwen3'):
        if family not in cache:
            d = str(tmp_path_factory.mktemp('vlm_' + family))
            model, proc = (other_vlm_components if family in ('llava', 'gemma3') else vlm_components)(family)
            model.save_pretrained(d)
            proc.save_pretrained(d)
            cache[family] = d
        return cache[family]
    return get


def nan_reward(images, rows):
    """A broken reward plug-in for the NaN-skip test (train.py --reward_fn=conftest:nan_reward)."""
    return torch.full((len(images),), float('nan'))


def one_reward(images, rows):
    """A reward plug-in that returns one number for the whole batch (the shape-check test)."""
    return torch.tensor([1.0])


# -----------------------------------------------------------------------------
# tiny SD3 and FLUX pipelines (CLIP with a character-level BPE vocab; T5 with a small unigram vocab)

def clip_tokenizer():
    from transformers import CLIPTokenizer
    chars = [chr(c) for c in range(32, 127)]
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + '</w>', len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 77
    return tok


def t5_tokenizer():
    from transformers import T5Tokenizer
    words = 'a photo of red blue green dog cat monkey dance bad quality blurry hello world number'.split()
    vocab = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0)] + [('\u2581' + w, -1.0) for w in words] + \
            [(chr(c), -5.0) for c in range(97, 123)] + [('\u2581', -2.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _clip_encoder(cls, projection=True):
    from transformers import CLIPTextConfig
    return cls(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                              num_attention_heads=4, num_hidden_layers=2, vocab_size=200, projection_dim=32,
                              max_position_embeddings=77)).eval()


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8)).eval()


def sd3_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                               pooled_projection_dim=64, out_channels=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D'] * 2,
                        up_block_types=['UpDecoderBlock2D'] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=1.5035,
                        shift_factor=0.0609)
    return StableDiffusion3Pipeline(
        transformer=tr, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip_encoder(CLIPTextModelWithProjection), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_encoder(CLIPTextModelWithProjection), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(), tokenizer_3=t5_tokenizer())


def flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D'] * 2,
                        up_block_types=['UpDecoderBlock2D'] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159)
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    return FluxPipeline(transformer=tr, vae=vae, scheduler=sch, text_encoder=_clip_encoder(CLIPTextModel),
                        tokenizer=clip_tokenizer(), text_encoder_2=_t5_encoder(), tokenizer_2=t5_tokenizer())


BUILDERS = {'zimage': zimage_pipeline, 'qwenimage': qwenimage_pipeline, 'sd3': sd3_pipeline, 'flux': flux_pipeline}
