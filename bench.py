"""
Speed and memory of every phase against its obvious baseline, measured in one run (ratios, min of N).

    python bench.py --quick          # CPU, tiny random models, < 2 minutes
    python bench.py                  # more repeats / bigger batches

Rows: rollout (our sampler vs the diffusers pipeline), reward (batched + masked vs a per-sample
loop; label-only lm_head vs full-sequence logits), update (AWM step vs a plain flow-matching step,
with and without the KL/EMA terms). A whole iteration's breakdown is train.py's own log: every
log.jsonl row has t_rollout, t_reward, t_update, t_eval and img_per_s, and t_ckpt (rows a resume
read back from a checkpoint lack t_ckpt, which is measured after the checkpoint is written). Writes out/bench.json.

    python bench.py --gpu            # one GPU: the real architectures at paper size, random weights
    python bench.py --gpu --dry      # the same code on tiny sizes (CPU or GPU), to check it before a lease

--gpu builds Z-Image (6B transformer, Qwen3-4B text encoder, FLUX VAE), Qwen-Image (20B, Qwen2.5-VL-7B text encoder)
and Qwen3-VL-8B / -32B from the configs below with random weights (speed and memory do not depend on the weights;
nothing is downloaded) and measures the paper's settings (bf16, 1024 x 1024, 30 Euler steps, CFG 3.5, labels of
~300 tokens, LoRA rank 64, micro-batch 2 x 6 timesteps): rollout and reward images/s, the AWM update's time and
model-FLOP utilisation in the variants of UPDATE_VARIANTS, a kernel profile of the update, eager vs compiled
blocks (compile = True), each phase's peak memory, and from those the per-iteration time of the paper's run on
8 GPUs. Then it runs train.py itself on the GPU (tiny models). --phases picks the models and measurements; rows
are written as they come (out/bench_gpu.json), so a run cut short keeps what it measured.
"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial

import torch

import awm
import conftest
import reward
import sample

REPEATS = 3                # min over this many timed runs (after one warm-up)
N_IMAGES = 8               # rollout: images per call, CFG on (the setting)
ROLLOUT_STEPS = 10
SIZE = 32
REWARD_B = 32              # reward: batch size for the batched-vs-loop ratio
VOCAB_BENCH = 32000        # VLM vocab for the memory row (real Qwen: 151k)
TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')


def best(fn):
    fn()                                                     # warm-up
    ts = []
    for _ in range(REPEATS):                                 # (read at call time: --quick or not)
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def bench_rollout(tmp, family):
    import diffusers
    d = os.path.join(tmp, family)
    if not os.path.isdir(d):
        conftest.BUILDERS[family]().save_pretrained(d)
    m = sample.load_model(d)
    pipe = getattr(diffusers, m.pipeline).from_pretrained(d)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f'a red dog number {i}' for i in range(N_IMAGES)]
    noise = sample.initial_noise(m, list(range(N_IMAGES)), SIZE, SIZE)
    kw = (dict(true_cfg_scale=4.0, latents=sample._pack(noise)) if family == 'qwenimage' else
          dict(guidance_scale=4.0, latents=noise))
    t_pipe = best(lambda: pipe(prompts, negative_prompt=['blurry'] * N_IMAGES, height=SIZE, width=SIZE,
                               num_inference_steps=ROLLOUT_STEPS, output_type='pt', **kw))
    t_ours = best(lambda: sample.generate(m, prompts, list(range(N_IMAGES)), ROLLOUT_STEPS, 4.0, SIZE, SIZE,
                                          'blurry', batch=N_IMAGES))
    return {'phase': f'rollout {family}', 'ours_s': t_ours, 'baseline_s': t_pipe, 'ratio': t_ours / t_pipe,
            'target': '<= 0.8'}


def bench_qwen_decode(tmp):
    """Where Qwen-Image's rollout time went: its causal video VAE decoding one frame vs our 2D decode."""
    vae = sample.load_model(os.path.join(tmp, 'qwenimage')).vae
    z = torch.randn(N_IMAGES, vae.config.z_dim, SIZE // 8, SIZE // 8)
    with torch.no_grad():
        t_video = best(lambda: vae.decode(z[:, :, None]))
        t_frame = best(lambda: sample.qwen_vae_decode_frame(vae, z))
    return {'phase': 'Qwen-Image VAE: single-frame decode vs video decode', 'ours_s': t_frame,
            'baseline_s': t_video, 'ratio': t_frame / t_video, 'target': 'info'}


def bench_reward():
    from PIL import Image
    import numpy as np
    model, proc = conftest.vlm_components('qwen3')
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(REWARD_B)]
    labels = [' '.join(['a red dog and a blue cat on a green hello world'] * (4 + i % 8)) for i in range(REWARD_B)]
    t_batch = best(lambda: reward.promptecho_reward(model, proc, ims, labels, max_batch=REWARD_B))
    t_loop = best(lambda: [reward.promptecho_reward(model, proc, [im], [l]) for im, l in zip(ims, labels)])
    # memory of the logits: label positions only vs the full sequence, at a realistic vocab
    enc = proc(text=[reward.chat_context(proc, reward.QUERY, l) for l in labels], images=ims, padding=True)
    T = len(enc['input_ids'][0]) + max(len(proc.tokenizer(l)['input_ids']) for l in labels)
    n_lab = sum(len(proc.tokenizer(l)['input_ids']) for l in labels)
    # full-sequence logits of one forward of max_batch rows vs ours: at most LOGITS_CHUNK positions at once
    full, ours = REWARD_B * T * VOCAB_BENCH * 4, min(n_lab, reward.LOGITS_CHUNK) * VOCAB_BENCH * 4
    return [{'phase': f'reward B={REWARD_B} batched vs loop', 'ours_s': t_batch, 'baseline_s': t_loop,
             'ratio': t_loop / t_batch, 'target': '>= 4 (speed-up)'},
            {'phase': f'reward peak logits bytes, vocab {VOCAB_BENCH}, {n_lab} label tokens (analytic)',
             'ours_s': ours, 'baseline_s': full, 'ratio': ours / full, 'target': '<= 0.25'}]


def bench_update(tmp):
    m = sample.load_model(os.path.join(tmp, 'zimage'))
    params = sample.add_lora(m, 8, 16)
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    B, T = 8, 3
    cond = sample.encode(m, [f'a red dog {i}' for i in range(B)])
    x0 = torch.randn(B, *sample.latent_shape(m, SIZE, SIZE))
    sig = torch.rand(B * T) * 0.9 + 0.05
    eps = torch.randn(B * T, *x0.shape[1:])
    x0r = x0.repeat_interleave(T, 0)
    xs, tgt = awm.add_noise(x0r, eps, sig), awm.velocity_target(x0r, eps)
    cb = sample.take(cond, torch.arange(B).repeat_interleave(T))
    adv = torch.randn(B * T)

    def step(kind):
        v = sample.velocity(m, xs, sig, cb)
        v_ref = v_ema = None
        if kind == 'awm+kl+ema':
            with torch.no_grad():
                m.transformer.disable_adapters()
                v_ref = sample.velocity(m, xs, sig, cb)
                m.transformer.enable_adapters()
                v_ema = sample.velocity(m, xs, sig, cb)    # same cost as swapping in the EMA weights
        if kind == 'plain':
            loss = (v - tgt).pow(2).mean()                   # pretraining flow matching
        else:
            loss, _ = awm.awm_loss(v, tgt, adv, v_ref, v_ema, 1e-3 if v_ref is not None else 0.0,
                                   1e-3 if v_ema is not None else 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    t = {k: best(lambda k=k: step(k)) for k in ('plain', 'awm', 'awm+kl+ema')}
    return [{'phase': 'update AWM vs plain flow matching', 'ours_s': t['awm'], 'baseline_s': t['plain'],
             'ratio': t['awm'] / t['plain'], 'target': '<= 1.2'},
            {'phase': 'update AWM+KL+EMA vs plain (2 extra no-grad forwards)', 'ours_s': t['awm+kl+ema'],
             'baseline_s': t['plain'], 'ratio': t['awm+kl+ema'] / t['plain'], 'target': 'info'}]



# -----------------------------------------------------------------------------
# GPU: the real architectures at paper size, random weights (bench.py --gpu)

GPU_RES, GPU_STEPS, GPU_CFG = 1024, 30, 3.5       # the paper's rollout
GPU_ROLLOUT_B = 4                                 # images per sampler call (config/zimage.py rollout_batch)
GPU_REWARD_B = 8                                  # images per VLM forward (config/zimage.py reward_batch)
GPU_MB, GPU_T, GPU_RANK = 2, 6, 64                # update: micro-batch x timesteps per forward, LoRA rank
UPDATE_VARIANTS = [  # (micro-batch, share of blocks checkpointed, peft's input cast on), eager
    (GPU_MB, 1.0, True),                          # train.py until 2026-12-04
    (GPU_MB, 1.0, False),                         # train.py now (add_lora(autocast=True))
    (GPU_MB, 0.5, False),                         # grad_checkpointing = 0.5
    (GPU_MB, 0.0, False),                         # grad_checkpointing = 0
    (1, 0.0, False),
    (2 * GPU_MB, 1.0, False),
]                                                 # the 'compile' phase: train.py's default eager, then compiled
PAPER = dict(G=32, K=8, gpus=8, epochs=4)         # per iteration: 32 prompts x 8 images, 4 epochs, on 8 GPUs
PEAK_TFLOPS = 989.0                               # H100/H200 SXM dense bf16 (datasheet), for MFU
PHASES = ('zimage', 'qwenimage', 'rollout', 'update', 'profile', 'reward', 'smoke', 'compile')  # models, measurements
SIZES = {  # real: the public configs (Tongyi-MAI/Z-Image, Qwen/Qwen3-4B, FLUX VAE, Qwen/Qwen3-VL-8B/32B-Instruct,
           # Qwen/Qwen-Image: its transformer, Qwen2.5-VL-7B text encoder and VAE)
    'real': dict(
        zimage=dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
        te=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936),
        vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24]),
        vlm={'8B': dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32),
             '32B': dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64)},
        vlm_text=dict(num_key_value_heads=8, head_dim=128, mrope=[24, 20, 20]), vocab=151936,
        qwenimage=dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                       axes_dims_rope=(16, 56, 56)),
        qwen_te=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, mrope=[16, 24, 24]),
        qwen_vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16),
        qwen_vae=dict(base_dim=96, num_res_blocks=2),
        res=GPU_RES, label_reps=12),
    'dry': dict(
        zimage=dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                    axes_dims=[8, 12, 12], axes_lens=[256, 64, 64]),
        te=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, vocab_size=1000),
        vae=dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[1]),
        vlm={'8B': dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
             '32B': dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2)},
        vlm_text=dict(num_key_value_heads=1, head_dim=32, mrope=[8, 4, 4]), vocab=1000,
        qwenimage=dict(num_layers=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=32,
                       axes_dims_rope=(8, 4, 4)),
        qwen_te=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=1000, mrope=[2, 3, 3]),
        qwen_vision=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2),
        qwen_vae=dict(base_dim=24, num_res_blocks=1),
        res=128, label_reps=2),
}


@contextmanager
def made_on(device, dtype):
    """Modules built inside are created on device in dtype (no CPU copy of a 32B model first)."""
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(torch.float32)


def zimage_transformer(cfg):
    from diffusers import ZImageTransformer2DModel
    tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, norm_eps=1e-5,
                                  qk_norm=True, rope_theta=256.0, t_scale=1000.0, **cfg)
    tr.x_pad_token.data.normal_()                              # pad tokens start as torch.empty
    tr.cap_pad_token.data.normal_()
    return tr.eval().requires_grad_(False)


def qwenimage_transformer(cfg):
    from diffusers import QwenImageTransformer2DModel
    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, guidance_embeds=False,
                                       **cfg).eval().requires_grad_(False)


def set_variant(m, share, cast):
    """grad_checkpointing = share and peft's cast of LoRA inputs to fp32 on or off (train.py: off under autocast)."""
    m.transformer.disable_gradient_checkpointing()
    sample.checkpoint_blocks(m, share)
    sample.lora_input_cast(m, cast)


def update_flops(m, x0, cond, sig, autocast, rank, small_transformer, n_layers, share):
    """FLOPs of one update micro-step (GPU_MB x GPU_T) of the full transformer, counted on copies with 1 and 2 main
    layers (linear in the layer count): under FlopCounterMode the full model's step ran out of memory on an H200.
    share 0: the model's FLOPs; share 1: every block's forward counted again (the recompute)."""
    f = []
    for n in (1, 2):
        with made_on(m.device, m.dtype):
            tr = small_transformer(n)
        small = copy.copy(m)
        small.transformer = tr
        params = sample.add_lora(small, rank, 2 * rank, autocast=True)
        for p in params:
            p.data = p.data.float()
        sample.checkpoint_blocks(small, share)
        tr.train()
        opt = torch.optim.AdamW(params, lr=1e-5)
        f.append(count_flops(partial(update_step, small, params, opt, x0, cond, sig, GPU_MB, GPU_T, autocast)))
    return f[0] + (n_layers - 1) * (f[1] - f[0])


def build_zimage(sz, device, dtype):
    """Z-Image's parts at the given sizes, random weights, made on the device in its dtype."""
    from diffusers import AutoencoderKL
    from transformers import Qwen3Config, Qwen3Model
    with made_on(device, dtype):
        tr = zimage_transformer(sz['zimage'])
        te = Qwen3Model(Qwen3Config(max_position_embeddings=40960, rope_theta=1e6, **sz['te']))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D'] * 4,
                            up_block_types=['UpDecoderBlock2D'] * 4, latent_channels=16, norm_num_groups=32,
                            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                            use_post_quant_conv=False, **sz['vae'])
    for p in (te, vae):
        p.eval().requires_grad_(False)
    sched = {'num_train_timesteps': 1000, 'shift': 3.0, 'use_dynamic_shifting': False}
    return sample.assemble('ZImagePipeline', device, dtype, transformer=tr, vae=vae, text_encoder=te,
                           tokenizer=conftest.bpe_tokenizer(conftest.CORPUS), scheduler=sched)


def build_qwenimage(sz, device, dtype):
    """Qwen-Image's parts (20B MMDiT, Qwen2.5-VL-7B text encoder, its causal video VAE), random weights."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    t = dict(sz['qwen_te'])
    rope = {'mrope_section': t.pop('mrope'), 'rope_type': 'default', 'type': 'default'}
    cfg = Qwen2_5_VLConfig(text_config=dict(t, rope_scaling=rope, rope_theta=1e6),
                           vision_config=dict(sz['qwen_vision'], out_hidden_size=t['hidden_size']),
                           hidden_size=t['hidden_size'], vocab_size=t['vocab_size'], vision_end_token_id=151653,
                           vision_start_token_id=151652, vision_token_id=151654)
    with made_on(device, dtype):
        tr = qwenimage_transformer(sz['qwenimage'])
        te = Qwen2_5_VLForConditionalGeneration(cfg).eval().requires_grad_(False)
        vae = AutoencoderKLQwenImage(z_dim=16, dim_mult=[1, 2, 4, 4], temperal_downsample=[False, True, True],
                                     **sz['qwen_vae']).eval().requires_grad_(False)
    sched = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type='exponential',
                 use_dynamic_shifting=True)
    return sample.assemble('QwenImagePipeline', device, dtype, transformer=tr, vae=vae, text_encoder=te,
                           tokenizer=conftest.bpe_tokenizer(conftest.CORPUS), scheduler=sched)


def build_vlm(sz, size, device, dtype):
    """A Qwen3-VL of the given size (random weights) and an image-only processor capped at the rollout's pixels."""
    from transformers import Qwen3VLForConditionalGeneration
    tok, ids = conftest.vlm_tokenizer('qwen3', vocab_size=400)
    t = sz['vlm_text']
    text = dict(sz['vlm'][size], num_key_value_heads=t['num_key_value_heads'], head_dim=t['head_dim'],
                max_position_embeddings=262144, rope_parameters={'rope_type': 'default', 'rope_theta': 5e6,
                                                                 'mrope_section': t['mrope'], 'mrope_interleaved': True})
    vision = dict(sz['vision'], out_hidden_size=text['hidden_size'], patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, hidden_act='gelu_pytorch_tanh')
    cfg = conftest.qwen3vl_config(ids, sz['vocab'], text, vision)
    with made_on(device, dtype):
        model = Qwen3VLForConditionalGeneration(cfg).eval().requires_grad_(False)
    return model, conftest.vlm_processor('qwen3', tok)


def nbytes(*modules):
    return sum(p.numel() * p.element_size() for mod in modules for p in mod.parameters())


def timed(fn, device, repeats=2):
    """min over repeats of fn's wall time after one warm-up, the warm-up's peak memory above the start (bytes), and
    the warm-up's time (a compiled model's first call compiles)."""
    cuda = str(device).startswith('cuda')
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mem = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() - mem if cuda else 0
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return min(ts), peak, first


def count_flops(fn):
    """FLOPs of one call (matmuls and attention, as torch's FlopCounterMode counts them; nan if it cannot)."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as fc:
            fn()
    except Exception as e:
        print(f"flop count failed: {type(e).__name__}: {e}")
        return float('nan')
    return fc.get_total_flops()


def kernel_profile(fn, device):
    """Where one call's GPU time goes: kernel time by kind (matmul / attention / other) and the top kernels;
    busy = kernel time / wall time (below 1: the GPU waits on the host)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = str(device).startswith('cuda')
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    if cuda:
        ev = [(e.key, e.self_device_time_total) for e in prof.key_averages() if e.device_type.name == 'CUDA']
    else:                                                            # --dry: CPU ops, to exercise the code
        ev = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    kinds = {'attention': ('flash', 'fmha', 'attention', 'efficient'), 'matmul': ('gemm', 'nvjet', 'xmma', 'cutlass',
                                                                                 'matmul', 'aten::mm', 'addmm')}
    kind = lambda k: next((name for name, keys in kinds.items() if any(s in k.lower() for s in keys)), 'other')
    total = sum(us for _, us in ev) or 1.0
    share = {name: round(sum(us for k, us in ev if kind(k) == name) / total, 3) for name in (*kinds, 'other')}
    top = sorted(ev, key=lambda e: -e[1])[:12]
    return dict(wall_s=wall, kernel_s=total / 1e6, busy=total / 1e6 / wall, share=share,
                top=[(k[:100], round(us / 1e3, 1), round(us / total, 3)) for k, us in top])


def update_step(m, params, opt, x0, cond, sigmas, mb, T, autocast):
    """One AWM micro-step as train.py takes it (mb rollouts x T noise levels in one forward), then an optimizer step
    (train.py steps once per batch_size rollouts; the LoRA's AdamW step is a negligible part of the time)."""
    idx = torch.arange(mb) % x0.shape[0]
    sig = torch.stack([awm.sample_train_sigmas(sigmas, 1, T, 0.9)[0] for _ in range(mb)]).flatten().to(m.device)
    x0r = x0[idx].repeat_interleave(T, 0)                              # [mb*T, C, h, w]
    eps = torch.randn_like(x0r)
    x_sig, v_tgt = awm.add_noise(x0r, eps, sig), awm.velocity_target(x0r, eps)
    with autocast:
        v = sample.velocity(m, x_sig.to(m.dtype), sig, sample.take(cond, idx.repeat_interleave(T)))
    loss, _ = awm.awm_loss(v, v_tgt, torch.randn(mb * T, device=m.device))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def free(device):
    """Give back what an out-of-memory step or a finished phase left allocated."""
    import gc
    gc.collect()
    if str(device).startswith('cuda'):
        torch.cuda.empty_cache()


def reward_row(sz, size, device, dtype, ims, labels, n_tok, add, park=False):
    """The reward phase of one VLM size beside whatever is resident; False on out-of-memory."""
    is_cuda = str(device).startswith('cuda')
    free(device)
    vm, vp = build_vlm(sz, size, device, dtype)
    resident = (torch.cuda.memory_allocated() if is_cuda else 0) / 1e9
    try:
        t, peak, _ = timed(lambda: reward.promptecho_reward(vm, vp, ims, labels, max_batch=GPU_REWARD_B,
                                                         max_pixels=ims.shape[-1] ** 2), device, 2)
    except torch.OutOfMemoryError:
        add(phase=f'reward Qwen3-VL-{size}', oom=True, resident_gb=resident)
        return False
    add(phase=f'reward Qwen3-VL-{size} x {GPU_REWARD_B} images, labels {min(n_tok)}-{max(n_tok)} tokens', s=t,
        img_per_s=GPU_REWARD_B / t, vlm_gb=nbytes(vm) / 1e9, resident_gb=resident, peak_gb=resident + peak / 1e9)
    if park and is_cuda:                                             # train.py's parking with vlm_on_gpu = False
        ref = next(vm.parameters())[:4, :4].clone()
        ts = []
        for dev in ('cpu', device, 'cpu', device):                  # the first park pins a CPU copy, once
            t0 = time.perf_counter()
            sample.move(vm, dev)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        add(phase=f'park the {size} VLM on the CPU and fetch it (sample.move, vlm_on_gpu=False)', s_first_park=ts[0],
            s_fetch=ts[1], s_park=ts[2], s_fetch_again=ts[3], same_weights=bool(torch.equal(ref, next(vm.parameters())[:4, :4])))
    return True


def rollout_row(m, name, add, device, repeats=2):
    """The project's sampler at the paper's rollout; time per step from two step counts, so the 30-step figure is
    exact arithmetic. Returns (cond, sigmas, x0 after one step) for the update rows."""
    is_cuda = str(device).startswith('cuda')
    res = m.res
    prompts = [' '.join(['a red dog and a blue cat on a green hello world'] * 3)] * GPU_ROLLOUT_B
    gen = lambda steps: sample.generate(m, prompts, list(range(GPU_ROLLOUT_B)), steps, GPU_CFG, res, res, '',
                                        GPU_ROLLOUT_B)
    sig = sample.sigma_schedule(m, GPU_STEPS, res, res)
    cond, neg = sample.encode(m, prompts), sample.encode(m, [''])
    noise = sample.initial_noise(m, list(range(GPU_ROLLOUT_B)), res, res)
    one_step = lambda: sample.euler_sample(m, cond, noise, sig[-2:], GPU_CFG, sample.take(neg, [0] * GPU_ROLLOUT_B))
    if repeats:
        resident = (torch.cuda.memory_allocated() if is_cuda else 0) / 1e9
        t2, peak, _ = timed(lambda: gen(2), device, repeats)
        t6, _, _ = timed(lambda: gen(6), device, repeats)
        per_step = (t6 - t2) / 4
        t30 = t2 + (GPU_STEPS - 2) * per_step
        with torch.no_grad():
            f_step = count_flops(one_step)
        add(phase=f'{name} rollout {GPU_ROLLOUT_B} images {res}px CFG {GPU_CFG}', s_per_step=per_step,
            s_fixed=t2 - 2 * per_step, s_30_steps=t30, img_per_s=GPU_ROLLOUT_B / t30, resident_gb=resident,
            peak_gb=resident + peak / 1e9, mfu=f_step / per_step / PEAK_TFLOPS / 1e12)
    return cond, sig, one_step(), one_step                           # x0 [B, C, h, w], one CFG Euler step


def step_row(m, one_step, name, autocast, add, device):
    """One CFG Euler step of GPU_ROLLOUT_B images with the LoRA on, under autocast as train.py's rollouts (the first
    call of a compiled model compiles: s_first)."""
    m.transformer.eval()
    with torch.no_grad(), autocast:
        t, _, first = timed(one_step, device, 3)
    add(phase=f'{name} rollout step, {GPU_ROLLOUT_B} images {m.res}px CFG {GPU_CFG}, LoRA on', s_per_step=t,
        img_per_s_30_steps=GPU_ROLLOUT_B / (GPU_STEPS * t), s_first=first)
    m.transformer.train()


def lora_policy(m, rank):
    """The policy as train.py trains it on a GPU: LoRA in fp32 (peft's input cast off under autocast), AdamW."""
    params = sample.add_lora(m, rank, 2 * rank, autocast=True)
    for p in params:
        p.data = p.data.float()
    m.transformer.train()
    return params, torch.optim.AdamW(params, lr=1e-5)


def update_row(add, name, m, params, opt, x0, cond, sig, autocast, flops, mb=GPU_MB, share=1.0):
    """One update micro-step (mb rollouts x GPU_T timesteps): time, peak memory, first call (compiling), and the
    model-FLOP utilisation from flops = {share: FLOPs of a GPU_MB micro-step}; an out-of-memory row otherwise."""
    is_cuda = m.device.type == 'cuda'
    resident = (torch.cuda.memory_allocated() if is_cuda else 0) / 1e9
    try:
        t, peak, first = timed(lambda: update_step(m, params, opt, x0, cond, sig, mb, GPU_T, autocast), m.device,
                               2 if mb <= GPU_MB else 1)
    except Exception as e:                                           # out of memory, or compile: keep the other rows
        t, row = None, {'oom': True} if isinstance(e, torch.OutOfMemoryError) else {'error': f'{type(e).__name__}: {e}'[:300]}
    if t is None:                                                    # (the failed step's tensors are free only now)
        opt.zero_grad(set_to_none=True)
        free(m.device)
        add(phase=name, resident_gb=resident, **row)
        return
    f_model = flops[0.0] * mb / GPU_MB                               # FLOPs the model needs (no recompute)
    f_run = f_model + share * (flops[1.0] - flops[0.0]) * mb / GPU_MB
    add(phase=name, s=t, s_per_image=t / (mb * GPU_T), s_first=first, resident_gb=resident,
        peak_gb=resident + peak / 1e9, mfu=f_model / t / PEAK_TFLOPS / 1e12, tflops_executed=f_run / t / 1e12)


def update_name(model, mb=GPU_MB, share=1.0, cast=False):
    return (f'{model} update micro-batch {mb} x {GPU_T} timesteps, {share:g} of blocks checkpointed, input cast '
            f'{"on" if cast else "off"}')


def eager_vs_compiled(add, model, m, params, opt, x0, cond, sig, autocast, flops, one_step):
    """train.py's GPU default (all blocks checkpointed, input cast off) eager, then with compile = True."""
    for compiled in (False, True):
        if compiled:
            sample.compile_blocks(m)
        name = model + (' (compiled blocks)' if compiled else '')
        update_row(add, update_name(name), m, params, opt, x0, cond, sig, autocast, flops)
        step_row(m, one_step, name, autocast, add, m.device)


def zimage_rows(sz, device, dtype, autocast, add, late, phases):
    """Z-Image at paper size: rollout, the update's variants (UPDATE_VARIANTS), a kernel profile, train.py itself,
    the reward beside the resident policy. Returns the policy's resident GB (weights + LoRA + Adam)."""
    is_cuda = str(device).startswith('cuda')
    m = build_zimage(sz, device, dtype)
    m.res = sz['res']
    add(phase='Z-Image built', transformer_gb=nbytes(m.transformer) / 1e9, text_encoder_gb=nbytes(m.text_encoder) / 1e9,
        vae_gb=nbytes(m.vae) / 1e9, params_b=sum(p.numel() for p in m.transformer.parameters()) / 1e9)
    cond, sig, x0, one_step = rollout_row(m, 'Z-Image', add, device, 2 if 'rollout' in phases else 0)
    # UPDATE: LoRA r64 in fp32, AdamW, bf16 autocast, as train.py; the variants of UPDATE_VARIANTS
    rank = GPU_RANK if is_cuda else 4
    params, opt = lora_policy(m, rank)
    small = lambda n: zimage_transformer(dict(sz['zimage'], n_layers=n))
    flops = {s: update_flops(m, x0, cond, sig, autocast, rank, small, sz['zimage']['n_layers'], s) for s in (0.0, 1.0)}
    if 'profile' in phases:                                          # train.py's default on a GPU, after a warm-up
        set_variant(m, 1.0, False)
        step = lambda: update_step(m, params, opt, x0, cond, sig, GPU_MB, GPU_T, autocast)
        step()
        add(phase=f'profile: update micro-batch {GPU_MB}, all blocks checkpointed, input cast off',
            **kernel_profile(step, device))
    for mb, share, cast in UPDATE_VARIANTS:
        if 'update' in phases and not late():
            set_variant(m, share, cast)
            update_row(add, update_name('Z-Image', mb, share, cast), m, params, opt, x0, cond, sig, autocast, flops,
                       mb, share)
    if 'compile' in phases and not late():
        set_variant(m, 1.0, False)
        eager_vs_compiled(add, 'Z-Image', m, params, opt, x0, cond, sig, autocast, flops, one_step)
    for flags in ([[]] if 'smoke' in phases else []) + ([['--compile=True']] if 'compile' in phases and is_cuda else []):
        with tempfile.TemporaryDirectory() as tmp:                  # train.py itself on this device (tiny models)
            for row in train_smoke(tmp, device, flags):
                add(**row)
    policy_gb = (torch.cuda.memory_allocated() if is_cuda else 0) / 1e9   # weights + LoRA + Adam, everything resident
    m.transformer.eval()
    # REWARD: the project's masked reward, ~300-token labels, 1024^2 images (1024 vision tokens each)
    if 'reward' in phases:
        res = sz['res']
        ims = torch.rand(GPU_REWARD_B, 3, res, res)
        labels = [' '.join(['a red dog and a blue cat on a green hello world circle square'] * (sz['label_reps'] + 2 * i))
                  for i in range(GPU_REWARD_B)]
        n_tok = [len(t) for t in conftest.vlm_tokenizer('qwen3', vocab_size=400)[0](labels)['input_ids']]
        for size in ('8B', '32B'):
            if late():
                break
            if size == '32B':
                sample.move([m.text_encoder, m.vae], 'cpu')         # as train.py with text_encoder/vae_on_gpu = False
            if not reward_row(sz, size, device, dtype, ims, labels, n_tok, add, park=size == '32B'):
                break
    return policy_gb


def gpu_rows(sz, device, out, budget_s, phases=PHASES):
    """Measure each phase at the given sizes; each row is written to out as soon as it is measured."""
    t_start, rows = time.time(), []
    dtype, is_cuda = torch.bfloat16, str(device).startswith('cuda')   # bf16 on the CPU too: --dry checks that path
    autocast = torch.autocast(device.split(':')[0], dtype=dtype)
    late = lambda: time.time() - t_start > budget_s

    def add(**row):
        row['elapsed_s'] = round(time.time() - t_start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        reward.write_json({'device': torch.cuda.get_device_name() if is_cuda else 'cpu', 'torch': torch.__version__,
                           'date': time.strftime('%Y-%m-%d'), 'rows': rows}, out)

    if is_cuda:                                                      # the chip's measured ceiling
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        t, _, _ = timed(lambda: a @ a, device, 5)
        add(phase='bf16 matmul 8192^3', s=t, tflops=2 * 8192 ** 3 / t / 1e12)
        del a
    policy_gb = zimage_rows(sz, device, dtype, autocast, add, late, phases) if 'zimage' in phases else 0.0
    free(device)
    # the paper's run from the figures above (compiled where measured: config/zimage.py compiles), per GPU per
    # iteration: G*K/gpus rollouts, each rollout call 30 Euler steps + its fixed cost (encoding, decoding)
    n = PAPER['G'] * PAPER['K'] // PAPER['gpus']
    row = lambda phase: next((r for r in rows if r['phase'].startswith(phase) and 'oom' not in r and 'error' not in r),
                             None)                                   # the first measured row of that phase
    fixed = row('Z-Image rollout 4')
    step = row('Z-Image (compiled blocks) rollout step') or row('Z-Image rollout step') or fixed
    upd = row(update_name('Z-Image (compiled blocks)')) or row(update_name('Z-Image'))
    rew = row('reward Qwen3-VL-32B')
    park = next((r for r in rows if r['phase'].startswith('park the 32B')), None)
    if step and upd and rew:
        t_roll = n / GPU_ROLLOUT_B * (GPU_STEPS * step['s_per_step'] + (fixed['s_fixed'] if fixed else 0.0))
        t_rew, t_upd = n / GPU_REWARD_B * rew['s'], n * PAPER['epochs'] / GPU_MB * upd['s']
        t_park = park['s_fetch_again'] + park['s_park'] if park else 0.0
        total = t_roll + t_rew + t_upd + t_park
        add(phase=f'paper iteration per GPU ({n} rollouts, {PAPER["epochs"]} epochs, 8 GPUs), from: {step["phase"]}; '
                  f'{upd["phase"]}', s_rollout=t_roll, s_reward=t_rew, s_update=t_upd, s_park_fetch_vlm=t_park,
            s_total=total, h_per_100_iters=total * 100 / 3600, policy_resident_gb=policy_gb)
    if 'qwenimage' in phases and not late():
        try:
            qwenimage_rows(sz, device, dtype, autocast, add, phases)
        except Exception as e:                                       # keep the rows above
            add(phase='Qwen-Image', error=f'{type(e).__name__}: {str(e)[:300]}')
    return rows


def qwenimage_rows(sz, device, dtype, autocast, add, phases):
    """Qwen-Image at paper size: its rollout, and the update at micro-batch GPU_MB with train.py's GPU defaults."""
    is_cuda = str(device).startswith('cuda')
    m = build_qwenimage(sz, device, dtype)
    m.res = sz['res']
    add(phase='Qwen-Image built', transformer_gb=nbytes(m.transformer) / 1e9, text_encoder_gb=nbytes(m.text_encoder) / 1e9,
        vae_gb=nbytes(m.vae) / 1e9, params_b=sum(p.numel() for p in m.transformer.parameters()) / 1e9)
    cond, sig, x0, one_step = rollout_row(m, 'Qwen-Image', add, device, 1 if 'rollout' in phases else 0)
    sample.move([m.text_encoder, m.vae], 'cpu')                     # as train.py's update phase with both parked
    rank = GPU_RANK if is_cuda else 4
    params, opt = lora_policy(m, rank)
    sample.checkpoint_blocks(m, 1.0)
    small = lambda n: qwenimage_transformer(dict(sz['qwenimage'], num_layers=n))
    flops = {s: update_flops(m, x0, cond, sig, autocast, rank, small, sz['qwenimage']['num_layers'], s) for s in (0.0, 1.0)}
    if 'compile' in phases:
        eager_vs_compiled(add, 'Qwen-Image', m, params, opt, x0, cond, sig, autocast, flops, one_step)
    else:
        update_row(add, update_name('Qwen-Image'), m, params, opt, x0, cond, sig, autocast, flops)


def train_smoke(tmp, device, extra=()):
    """train.py itself on this device: 2 iterations, tiny models; torchrun with 1 process; an exact resume."""
    zd, vd, pf = os.path.join(tmp, 'zimage'), os.path.join(tmp, 'vlm'), os.path.join(tmp, 'p.jsonl')
    conftest.BUILDERS['zimage']().save_pretrained(zd)
    vm, vp = conftest.vlm_components('qwen3')
    vm.save_pretrained(vd)
    vp.save_pretrained(vd)
    with open(pf, 'w') as f:
        f.write(''.join(json.dumps({'prompt': p}) + '\n' for p in ['a red dog', 'a blue cat', 'hello world', 'bad quality']))
    args = [f'--model={zd}', f'--vlm={vd}', f'--prompts={pf}', '--prompts_per_iter=2', '--images_per_prompt=4',
            '--rollout_steps=3', '--resolution=64', '--batch_size=4', '--micro_batch=2', '--train_timesteps=2',
            '--epochs_per_iter=2', '--lora_rank=4', '--lora_alpha=8', '--save_every=1', '--sample_every=0',
            '--lr=1e-3', f'--device={device}', '--vlm_on_gpu=False', '--text_encoder_on_gpu=False', *extra]
    rows = []
    runs = (('python train.py', [sys.executable, TRAIN], not extra),
            ('torchrun --nproc_per_node 1 train.py', [sys.executable, '-m', 'torch.distributed.run',
                                                      '--standalone', '--nproc_per_node=1', TRAIN], False))
    for name, cmd, resume in runs[:1 if extra else 2]:              # extra flags (--compile=True): one process,
        d = os.path.join(tmp, name.split()[0])                      # no resume (each process compiles anew)
        t = time.time()
        p = subprocess.run(cmd + args + [f'--out_dir={d}', '--max_iters=2'], capture_output=True, text=True)
        if p.returncode == 0 and resume:                             # an exact resume for one more iteration
            p = subprocess.run(cmd + args + [f'--out_dir={d}', '--max_iters=3', '--resume=True'], capture_output=True,
                               text=True)
        f = os.path.join(d, 'log.jsonl')
        log = [json.loads(l) for l in open(f)] if os.path.isfile(f) else []
        rows.append({'phase': f'{" ".join([name, *extra])} on {device} (2 iterations{" + resume to 3" if resume else ""})',
                     'ok': p.returncode == 0, 'iters': [r['iter'] for r in log],
                     'loss_finite': all(math.isfinite(r.get('loss', math.nan)) for r in log), 's': time.time() - t,
                     'stderr_tail': p.stderr[-600:] if p.returncode else ''})
    return rows


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true', help="CPU, fewer repeats (< 2 min)")
    ap.add_argument('--gpu', action='store_true', help="the real architectures at paper size, random weights (one GPU)")
    ap.add_argument('--dry', action='store_true', help="with --gpu: tiny sizes, to check the code on a CPU first")
    ap.add_argument('--budget', type=float, default=420, help="with --gpu: seconds after which no new phase starts")
    ap.add_argument('--phases', default=','.join(PHASES), help=f"with --gpu: which of {','.join(PHASES)}")
    ap.add_argument('--out', default='')
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.gpu:
        dev = 'cuda' if torch.cuda.is_available() else 'cpu'
        if dev == 'cpu' and not a.dry:
            sys.exit("--gpu needs a CUDA GPU (add --dry to run the same code on tiny sizes here)")
        out = a.out or 'out/bench_gpu.json'
        os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
        phases = a.phases.split(',')
        if set(phases) - set(PHASES):
            sys.exit(f"--phases: unknown {sorted(set(phases) - set(PHASES))}; choose from {','.join(PHASES)}")
        rows = gpu_rows(SIZES['dry' if a.dry else 'real'], dev, out, a.budget, phases)
        reward.write_json({'device': torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
                           'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d'), 'rows': rows}, out)
        print(f"wrote {out}")
        sys.exit(0 if all(r.get('ok', True) for r in rows) else 1)
    if not a.quick:
        REPEATS, N_IMAGES = 5, 16
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in ('zimage', 'qwenimage'):
            rows.append(bench_rollout(tmp, fam))
        rows.append(bench_qwen_decode(tmp))
        rows += bench_reward()
        rows += bench_update(tmp)
    print(f"{'phase':58s} {'ours':>10s} {'baseline':>10s} {'ratio':>7s}  target")
    for r in rows:
        print(f"{r['phase']:58s} {r['ours_s']:10.4g} {r['baseline_s']:10.4g} {r['ratio']:7.3f}  {r['target']}")
    out = a.out or 'out/bench.json'
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    reward.write_json({'device': 'cuda' if torch.cuda.is_available() else 'cpu', 'threads': torch.get_num_threads(),
                       'torch': torch.__version__, 'rows': rows}, out)
    print(f"wrote {out}")
