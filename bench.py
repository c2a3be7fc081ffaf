"""
Speed and memory of every phase against its obvious baseline, measured in one run (ratios, min of N).

    python bench.py --quick          # CPU, tiny random models, < 2 minutes
    python bench.py                  # more repeats / bigger batches

Rows: rollout (our sampler vs the diffusers pipeline), reward (batched + masked vs a per-sample
loop; label-only lm_head vs full-sequence logits), update (AWM step vs a plain flow-matching step,
with and without the KL/EMA terms). A whole iteration's breakdown is train.py's own log: every
log.jsonl row has t_rollout, t_reward, t_update, t_eval and img_per_s, and t_ckpt (rows a resume
read back from a checkpoint lack t_ckpt, which is measured after the checkpoint is written). Writes out/bench.json. The GPU section of issue #8 (real-size random-weight models) needs a lent GPU.
"""
import argparse
import json
import os
import time

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


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true', help="CPU, fewer repeats (< 2 min)")
    ap.add_argument('--out', default='out/bench.json')
    a = ap.parse_args()
    if not a.quick:
        REPEATS, N_IMAGES = 5, 16
    import tempfile
    torch.manual_seed(0)
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
    os.makedirs(os.path.dirname(a.out) or '.', exist_ok=True)
    info = {'device': 'cuda' if torch.cuda.is_available() else 'cpu', 'threads': torch.get_num_threads(),
            'torch': torch.__version__, 'rows': rows}
    with open(a.out + '.tmp', 'w') as f:
        json.dump(info, f, indent=2)
    os.replace(a.out + '.tmp', a.out)
    print(f"wrote {a.out}")
