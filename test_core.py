"""awm.py and sample.py tests (python -m pytest -q runs every test file; CPU, tiny random models built in
conftest.py), and the README's code references."""
import math
import os
import shutil

import numpy as np
import pytest
import torch

import awm


# -----------------------------------------------------------------------------
# awm.py

def test_fill_missing_rewards_by_hand():
    nan = float('nan')
    r = torch.tensor([[1.0, nan, 3.0, 4.0], [nan, nan, nan, nan], [2.0, 2.0, nan, 8.0]])
    want = torch.tensor([[1.0, 8 / 3, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 4.0, 8.0]])
    assert torch.allclose(awm.fill_missing(r), want)
    adv = awm.group_advantages(awm.fill_missing(r))
    assert adv[0, 1].abs() < 1e-6 and adv[2, 2].abs() < 1e-6 and (adv[1] == 0).all()  # filled entries: advantage 0


def test_group_advantages_closed_form():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 9.0]])
    a = awm.group_advantages(r, std_norm=True, eps=0.0)
    # by hand: group 0 mean 2.5, population std sqrt(1.25); group 1 mean 6, std sqrt(3)
    want0 = (np.array([1, 2, 3, 4]) - 2.5) / math.sqrt(1.25)
    want1 = (np.array([5, 5, 5, 9]) - 6.0) / math.sqrt(3.0)
    assert np.allclose(a[0].numpy(), want0, atol=1e-6)
    assert np.allclose(a[1].numpy(), want1, atol=1e-6)
    a_plain = awm.group_advantages(r, std_norm=False)
    assert np.allclose(a_plain.numpy(), (r - r.mean(1, keepdim=True)).numpy())
    a_clip = awm.group_advantages(r, std_norm=True, eps=0.0, clip=1.0)
    assert a_clip.abs().max() <= 1.0 and a_clip[1, 3] == 1.0
    a_pos = awm.group_advantages(r, std_norm=True, eps=0.0, positive_only=True)
    assert np.allclose(a_pos.numpy(), np.maximum(np.stack([want0, want1]), 0), atol=1e-6)  # max(A, 0) by hand
    # a group with equal rewards carries no signal: advantages exactly 0, not NaN
    assert torch.all(awm.group_advantages(torch.full((1, 8), 3.0)) == 0)


def test_sample_train_sigmas_grid_and_strata():
    sig = torch.cat([torch.linspace(1, 1 / 30, 30), torch.zeros(1)])  # a 30-step grid
    g = torch.Generator().manual_seed(0)
    s = awm.sample_train_sigmas(sig, n=500, k=6, frac=0.6, stratified=True, generator=g)
    assert s.shape == (500, 6)
    idx = torch.cdist(s.reshape(-1, 1), sig.reshape(-1, 1)).argmin(1).reshape(500, 6)
    assert torch.allclose(s, sig[idx])                        # values come from the grid
    assert idx.min() >= 1 and idx.max() < 18                  # never sigma=1, only the noisier 60%
    edges = torch.linspace(1, 18, 7)
    for j in range(6):                                        # column j stays in stratum j
        assert (idx[:, j] >= edges[j].long()).all() and (idx[:, j] < edges[j + 1].ceil()).all()
    assert set(idx.flatten().tolist()) == set(range(1, 18))   # every index of the noisier 60% is reachable
    u = awm.sample_train_sigmas(sig, n=2000, k=1, frac=1.0, stratified=False, generator=g)
    assert u.min() < 0.1 and u.max() > 0.9 and (u < 1).all() and (u > 0).all()
    for grid, frac in ((torch.tensor([1.0, 0.0]), 1.0), (sig, 1.5), (sig, 0.0)):   # no inner level, or out of the grid
        with pytest.raises(ValueError, match='0 < frac <= 1'):
            awm.sample_train_sigmas(grid, 4, 3, frac)


def test_noising_and_target_closed_form():
    x0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xs = awm.add_noise(x0, eps, sigma)
    assert torch.equal(xs[0], x0[0]) and torch.equal(xs[2], eps[2])
    assert torch.allclose(xs[1], 0.5 * (x0[1] + eps[1]))
    # the target is the exact derivative of the path: finite difference in sigma
    h = 1e-3
    fd = (awm.add_noise(x0, eps, sigma.clamp(max=0.9) + h) - awm.add_noise(x0, eps, sigma.clamp(max=0.9))) / h
    assert torch.allclose(fd, awm.velocity_target(x0, eps), atol=1e-3)


def test_awm_loss_closed_form_and_terms():
    v = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    tgt = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, t = awm.awm_loss(v, tgt, adv)
    # mse per sample = [1, 2]; mean(A * mse) = (2*1 - 1*2)/2 = 0
    assert abs(loss.item() - 0.0) < 1e-7 and abs(t['mse'].item() - 1.5) < 1e-7
    loss3, _ = awm.awm_loss(v, tgt, torch.tensor([3.0, 1.0]))   # (3*1 + 1*2)/2 = 2.5: a mean, not a sum (5)
    assert abs(loss3.item() - 2.5) < 1e-7
    v_ref = torch.zeros_like(v) + 1.0
    loss2, t2 = awm.awm_loss(v, tgt, adv, v_ref=v_ref, v_ema=torch.zeros_like(v), beta=0.1, ema_beta=0.01)
    kl = ((v - v_ref) ** 2).mean()                           # = (0+0+1+1)/4 = 0.5
    ema = (v ** 2).mean()                                    # = 1.5
    assert abs(t2['kl'].item() - kl.item()) < 1e-7 and abs(t2['ema'].item() - ema.item()) < 1e-7
    assert abs(loss2.item() - (0.1 * 0.5 + 0.01 * 1.5)) < 1e-7


def test_awm_zero_advantage_no_policy_gradient():
    v = torch.randn(4, 8, requires_grad=True)
    loss, _ = awm.awm_loss(v, torch.randn(4, 8), torch.zeros(4))
    loss.backward()
    assert torch.count_nonzero(v.grad) == 0


def test_awm_sign_pulls_positive_pushes_negative():
    tgt = torch.randn(2, 16)
    v0 = torch.randn(2, 16)
    for a, closer in ((1.0, True), (-1.0, False)):
        v = v0.clone().requires_grad_(True)
        loss, _ = awm.awm_loss(v, tgt, torch.tensor([a, a]))
        loss.backward()
        v_new = v.detach() - 0.05 * v.grad                    # one SGD step
        d0, d1 = (v0 - tgt).norm(dim=1), (v_new - tgt).norm(dim=1)
        assert torch.all(d1 < d0) if closer else torch.all(d1 > d0)


def test_awm_plain_and_ratio_forms_agree_on_policy():
    torch.manual_seed(0)
    tgt, adv = torch.randn(6, 3, 4), torch.randn(6)
    v1 = torch.randn(6, 3, 4, requires_grad=True)
    v2 = v1.detach().clone().requires_grad_(True)
    l1, _ = awm.awm_loss(v1, tgt, adv)                        # mean(A * mse)
    l2, _ = awm.awm_loss(v2, tgt, adv, clip_range=0.2)        # mean(max(-A r, -A clip(r))), r = 1
    l1.backward(); l2.backward()
    assert torch.allclose(v1.grad, v2.grad, atol=1e-7)        # identical gradient on-policy
    # the values differ by a constant with no gradient: ratio form = -mean(A)
    assert abs(l2.item() + adv.mean().item()) < 1e-6


def test_awm_ratio_form_off_policy_is_ppo_clip_by_hand():
    # after an optimizer step the rollouts are off-policy: r = pi_theta / pi_old = exp(mse_old - mse) per row,
    # loss = mean(max(-A r, -A clip(r, 1-c, 1+c))); a row whose ratio has left the clip range in its
    # advantage's direction gets no gradient, the others A r grad mse / N
    torch.manual_seed(2)
    N, c = 16, 0.2
    tgt, v_old = torch.randn(N, 3, 4), torch.randn(N, 3, 4)
    adv = torch.tensor([1.0, -1.0] * (N // 2)) * (torch.rand(N) + 0.5)
    v = (v_old + 0.3 * torch.randn(N, 3, 4)).requires_grad_(True)
    loss, _ = awm.awm_loss(v, tgt, adv, clip_range=c, v_old=v_old)
    loss.backward()
    d, d_old = (v.detach() - tgt).flatten(1), (v_old - tgt).flatten(1)
    r = torch.exp(d_old.pow(2).mean(1) - d.pow(2).mean(1))
    assert abs(loss.item() - torch.maximum(-adv * r, -adv * r.clamp(1 - c, 1 + c)).mean().item()) < 1e-6
    active = ~(((adv > 0) & (r > 1 + c)) | ((adv < 0) & (r < 1 - c)))
    assert active.any() and not active.all()                  # both cases occur in this draw
    want = (active * adv * r)[:, None] * 2 * d / d.shape[1] / N
    assert torch.allclose(v.grad.flatten(1), want, atol=1e-7)
    v2 = v.detach().clone().requires_grad_(True)               # with v_old = v it is the on-policy form again
    l2, _ = awm.awm_loss(v2, tgt, adv, clip_range=c, v_old=v.detach())
    l3, _ = awm.awm_loss(v.detach().clone().requires_grad_(True), tgt, adv, clip_range=c)
    assert abs(l2.item() - l3.item()) < 1e-6


def test_ghuber_weighting_closed_form_and_gradient():
    torch.manual_seed(1)
    mse, sig = torch.tensor([0.0, 0.25, 4.0]), torch.tensor([0.5, 0.8, 0.3])
    assert torch.allclose(awm.ghuber(mse, sig, p=1.0, eps=0.0), sig * mse)              # p = 1: sigma * mse
    assert torch.allclose(awm.ghuber(mse, sig, eps=0.0), sig * mse ** 0.25 / 0.25)      # (mse^p - 0) sigma / p
    tgt, adv, sig = torch.randn(5, 2, 3), torch.randn(5), torch.rand(5) * 0.9 + 0.05
    v = torch.randn(5, 2, 3, requires_grad=True)
    loss, t = awm.awm_loss(v, tgt, adv, sigma=sig)
    loss.backward()
    # by hand: d/dv mean_i A_i sigma_i (mse_i + eps)^p / p = A_i sigma_i mse_i^(p-1) * 2 (v_i - tgt_i) / D / N
    d = (v.detach() - tgt).flatten(1)
    m = d.pow(2).mean(1)
    want = (adv * sig * (m + 1e-10) ** -0.75)[:, None] * 2 * d / d.shape[1] / 5
    assert torch.allclose(v.grad.flatten(1), want, rtol=1e-5, atol=1e-7)
    assert abs(t['mse'].item() - m.mean().item()) < 1e-6                                 # the log stays the raw MSE
    v2 = v.detach().clone().requires_grad_(True)
    l2, _ = awm.awm_loss(v2, tgt, adv, clip_range=0.2, sigma=sig)                        # the ratio form on-policy
    l2.backward()
    assert torch.allclose(v2.grad, v.grad, atol=1e-7)


def test_ema_update():
    e, p = [torch.zeros(3)], [torch.ones(3)]
    awm.ema_update(e, p, decay=0.9)
    assert torch.allclose(e[0], torch.full((3,), 0.1))


# -----------------------------------------------------------------------------
# sample.py: our sampler against the diffusers pipelines

import sample


def _pipeline(family, path):
    import diffusers
    p = getattr(diffusers, sample.load_model.__globals__['json'].load(open(f"{path}/model_index.json"))['_class_name'])
    pipe = p.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe_images(pipe, family, prompt, neg, noise, steps, cfg, size):
    if family == 'qwenimage':                                  # Qwen-Image takes packed latents and true_cfg_scale
        return pipe(prompt, negative_prompt=neg, latents=sample._pack(noise), height=size, width=size,
                    num_inference_steps=steps, true_cfg_scale=cfg, output_type='pt').images
    if family == 'flux':                                       # FLUX: packed latents, distilled guidance input
        return pipe(prompt, latents=sample._pack(noise), height=size, width=size, num_inference_steps=steps,
                    guidance_scale=cfg, output_type='pt').images
    return pipe(prompt, negative_prompt=neg, latents=noise, height=size, width=size,
                num_inference_steps=steps, guidance_scale=cfg, output_type='pt').images


@pytest.mark.parametrize('family', ['zimage', 'qwenimage', 'sd3', 'flux'])
def test_sampler_matches_diffusers_pipeline(family, t2i_dir):
    path = t2i_dir(family)
    m = sample.load_model(path)
    pipe = _pipeline(family, path)
    size, steps = 32, 4
    noise = sample.initial_noise(m, [7], size, size)
    for cfg, neg in ((4.0, 'bad quality, blurry'), ({'zimage': 0.0, 'flux': 2.0}.get(family, 1.0), None)):
        ref = _pipe_images(pipe, family, 'a red dog and a blue cat', neg, noise.clone(), steps, cfg, size)
        ours, _ = sample.generate(m, ['a red dog and a blue cat'], [7], steps, cfg, size, size,
                                  negative_prompt=neg or '')
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4, (family, cfg)


def test_zimage_cfg_normalisation_and_truncation_match_pipeline(t2i_dir, monkeypatch):
    path = t2i_dir('zimage')
    m = sample.load_model(path)
    pipe = _pipeline('zimage', path)
    noise = sample.initial_noise(m, [7], 32, 32)
    for norm, trunc in ((0.5, 1.0), (0.0, 0.5), (0.5, 0.5)):   # each alone, then both (truncated steps: no norm)
        monkeypatch.setattr(sample, 'ZIMAGE_CFG_NORM', norm)
        monkeypatch.setattr(sample, 'ZIMAGE_CFG_TRUNC', trunc)
        ref = pipe('a red dog', negative_prompt='blurry', latents=noise.clone(), height=32, width=32,
                   num_inference_steps=6, guidance_scale=4.0, cfg_normalization=norm, cfg_truncation=trunc,
                   output_type='pt').images
        ours, _ = sample.generate(m, ['a red dog'], [7], 6, 4.0, 32, 32, negative_prompt='blurry')
        plain = pipe('a red dog', negative_prompt='blurry', latents=noise.clone(), height=32, width=32,
                     num_inference_steps=6, guidance_scale=4.0, output_type='pt').images
        assert (ref - plain).abs().max().item() > 1e-3, (norm, trunc)   # the option changes the image
        assert (ours - ref).abs().max().item() <= 1e-4, (norm, trunc)


@pytest.mark.parametrize('cfg', [dict(base_dim=24, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True]),
                                 dict(base_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,      # the real layout
                                      temperal_downsample=[False, True, True], z_dim=16)])
def test_qwen_vae_single_frame_decode_matches_video_decode(cfg):
    from diffusers import AutoencoderKLQwenImage
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**cfg).eval()
    for p in vae.parameters():                                  # zero-init biases/gammas would hide slice errors
        torch.nn.init.normal_(p, 0, 0.2 if p.dim() > 1 else 0.5)
    z = torch.randn(3, vae.config.z_dim, 5, 6)                  # non-square: h and w paddings must not swap
    with torch.no_grad():
        ref = vae.decode(z[:, :, None]).sample[:, :, 0]          # the diffusers video decode of one frame
        ours = sample.qwen_vae_decode_frame(vae, z)
    f = 2 ** (len(cfg['dim_mult']) - 1)                         # spatial upsampling of the decoder
    assert ours.shape == ref.shape == (3, 3, 5 * f, 6 * f)
    assert ref.abs().max() > 0.5 and ref.std() > 0.1           # a decode that says something
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('family', ['zimage', 'qwenimage', 'sd3', 'flux'])
def test_sampler_batch_invariance_and_seeds(family, t2i_dir):
    m = sample.load_model(t2i_dir(family))
    prompts = ['a red dog', 'green monkey dance', 'a photo of a cat', 'hello world', 'blue quality']
    batch, _ = sample.generate(m, prompts, [1, 2, 3, 4, 5], 3, 4.0, 32, 32, batch=5)
    alone, _ = sample.generate(m, prompts[2:3], [3], 3, 4.0, 32, 32)
    assert (batch[2] - alone[0]).abs().max().item() <= 1e-4     # same (prompt, seed) alone or in a batch of 5
    other, _ = sample.generate(m, prompts[2:3], [99], 3, 4.0, 32, 32)
    assert (other[0] - alone[0]).abs().max().item() > 1e-3      # the seed matters


@pytest.mark.parametrize('family', ['zimage', 'qwenimage', 'sd3', 'flux'])
def test_lora_round_trip_through_diffusers(family, t2i_dir, tmp_path):
    path = t2i_dir(family)
    m = sample.load_model(path)
    torch.manual_seed(0)
    sample.add_lora(m, rank=4, alpha=8)                          # alpha != rank: the metadata must carry it
    wrapped = {n.split('.lora_A')[0] for n, _ in m.transformer.named_parameters() if '.lora_A' in n}
    for target in sample.LORA_TARGETS[family]:                   # every target names modules of this family
        assert any(w.endswith('.' + target) for w in wrapped), (family, target)
    with torch.no_grad():
        for n, p in m.transformer.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.3)                                # B starts at 0: make the LoRA do something
    f = str(tmp_path / 'lora.safetensors')
    sample.save_lora(m, f)
    noise = sample.initial_noise(m, [3], 32, 32)
    ours, _ = sample.generate(m, ['a red dog'], [3], 3, 4.0, 32, 32, negative_prompt='blurry')
    pipe = _pipeline(family, path)
    base = _pipe_images(pipe, family, 'a red dog', 'blurry', noise.clone(), 3, 4.0, 32)
    pipe.load_lora_weights(f)
    ref = _pipe_images(pipe, family, 'a red dog', 'blurry', noise.clone(), 3, 4.0, 32)
    assert (ref - base).abs().max().item() > 1e-3                # the LoRA changes the image
    assert (ours - ref).abs().max().item() <= 1e-4               # and diffusers reads it exactly as we use it
    m2 = sample.load_model(path)
    sample.load_lora(m2, f)                                      # our own loader (resume) agrees too
    again, _ = sample.generate(m2, ['a red dog'], [3], 3, 4.0, 32, 32, negative_prompt='blurry')
    assert (again - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize('with_metadata', [True, False])
def test_foreign_lora_loads_as_diffusers_reads_it(t2i_dir, tmp_path, with_metadata):
    """A LoRA made elsewhere (other targets, ranks per module, its own alpha) loads as diffusers loads it."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file
    path = t2i_dir('zimage')
    m = sample.load_model(path)
    m.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4 if not with_metadata else 12, init_lora_weights='gaussian',
                                         target_modules=['to_q', 'to_v', 'w1'], rank_pattern={'layers.0.attention.to_q': 2}))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in m.transformer.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.3)
    f = str(tmp_path / 'lora.safetensors')
    sample.save_lora(m, f)                                       # diffusers format, with peft metadata
    if not with_metadata:                                        # keys only: ranks from shapes, alpha = r
        save_file(load_file(f), f)
    noise = sample.initial_noise(m, [3], 32, 32)
    pipe = _pipeline('zimage', path)
    pipe.load_lora_weights(f)
    ref = _pipe_images(pipe, 'zimage', 'a red dog', 'blurry', noise.clone(), 3, 4.0, 32)
    m2 = sample.load_model(path)
    sample.load_lora(m2, f)
    ours, _ = sample.generate(m2, ['a red dog'], [3], 3, 4.0, 32, 32, negative_prompt='blurry')
    plain, _ = sample.generate(sample.load_model(path), ['a red dog'], [3], 3, 4.0, 32, 32, negative_prompt='blurry')
    assert (ours - plain).abs().max().item() > 1e-3              # the LoRA changes the image
    assert (ours - ref).abs().max().item() <= 1e-4


def test_sd3_without_t5_matches_pipeline(tmp_path):
    import conftest
    from diffusers import StableDiffusion3Pipeline
    p = conftest.sd3_pipeline()
    p.text_encoder_3, p.tokenizer_3 = None, None                 # SD3 without T5: zeros in the T5 slot
    p.save_pretrained(tmp_path)
    m = sample.load_model(str(tmp_path))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    noise = sample.initial_noise(m, [5], 32, 32)
    ref = _pipe_images(pipe, 'sd3', 'a red dog', 'blurry', noise.clone(), 3, 4.0, 32)
    ours, _ = sample.generate(m, ['a red dog'], [5], 3, 4.0, 32, 32, negative_prompt='blurry')
    assert (ours - ref).abs().max().item() <= 1e-4


def test_sampler_bad_input(t2i_dir, tmp_path):
    m = sample.load_model(t2i_dir('zimage'))
    with pytest.raises(ValueError, match='nearest valid sizes: 32 or 36'):
        sample.check_size(m, 34, 32)
    # the positional embedding's end: Z-Image's RoPE has axes_lens = 32 positions per axis, 2x2 patches of a
    # 2x VAE: 128 px draws, 132 px is past the table (the transformer itself fails there) and is refused first
    assert sample.max_side(m) == 128
    assert sample.generate(m, ['a red dog'], [0], 1, 0.0, 128, 128)[0].shape == (1, 3, 128, 128)
    with pytest.raises(ValueError, match='covers at most 128 px per side'):
        sample.check_size(m, 132, 128)
    cond = sample.encode(m, ['a red dog'])
    with pytest.raises(IndexError, match='out of bounds'):
        sample.euler_sample(m, cond, torch.randn(1, 16, 66, 64), torch.tensor([1.0, 0.0]), 0.0, None)
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'model_index.json').write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match='supported: ZImagePipeline'):
        sample.load_model(str(bad))
    (bad / 'model_index.json').write_text('{"_class_name": "ZImagePipeline", "vae": ["diffusers", "AutoencoderKL"]}')
    with pytest.raises(FileNotFoundError, match="'vae' but the subfolder"):
        sample.load_model(str(bad))
    with pytest.raises(FileNotFoundError, match='not a diffusers model directory'):
        sample.load_model(str(tmp_path))
    with pytest.raises(ValueError, match='0 sampling steps'):
        sample.sigma_schedule(m, 0, 32, 32)
    m.scheduler = {**m.scheduler, 'stochastic_sampling': True}  # a scheduler variant the Euler sampler is not
    with pytest.raises(ValueError, match='stochastic_sampling is not supported'):
        sample.sigma_schedule(m, 4, 32, 32)


# -----------------------------------------------------------------------------
# the README: every file-and-function reference exists, the equation table's line ranges are exact

HERE = os.path.dirname(os.path.abspath(__file__))


def test_readme_table_names_exist():
    import ast
    import importlib
    import re
    text = open(os.path.join(HERE, 'README.md')).read() + open(os.path.join(HERE, 'TOY.md')).read()
    refs = set(re.findall(r'`(\w+)\.py:(\w+)`', text))
    assert len(refs) >= 10
    for mod, fn in refs:
        assert hasattr(importlib.import_module(mod), fn), f"README/TOY.md names {mod}.py:{fn}, which does not exist"
    ranges = set(re.findall(r'`(\w+)\.py:(\w+)` \(L(\d+)-(\d+)\)', text))   # the equation table's line ranges
    assert len(ranges) >= 10
    for mod, fn, lo, hi in ranges:
        defs = {n.name: (n.lineno, n.end_lineno) for n in ast.parse(open(os.path.join(HERE, mod + '.py')).read()).body
                if isinstance(n, ast.FunctionDef)}
        assert defs[fn] == (int(lo), int(hi)), f"README says {mod}.py:{fn} is L{lo}-{hi}, the file has L{defs[fn][0]}-{defs[fn][1]}"


def test_checkpoint_blocks_recomputes_the_chosen_share(t2i_dir):
    """grad_checkpointing = share: the first round(share * n) blocks of each list run their forward twice (once
    more in the backward), the others once, and the LoRA gradient is the same whatever the share."""
    m = sample.load_model(t2i_dir('zimage'))
    torch.manual_seed(0)
    params = sample.add_lora(m, 4, 4)
    with torch.no_grad():
        for n, p in m.transformer.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.3)
    tr = m.transformer.train()
    blocks = {f'{name}.{i}': b for name, lst in [('layers', tr.layers), ('noise_refiner', tr.noise_refiner),
                                                 ('context_refiner', tr.context_refiner)] for i, b in enumerate(lst)}
    runs = dict.fromkeys(blocks, 0)
    for k, b in blocks.items():
        b.register_forward_pre_hook(lambda mod, args, k=k: runs.__setitem__(k, runs[k] + 1))
    cond = sample.encode(m, ['a red dog', 'a blue cat'])
    x, sig = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 0.8])
    grads = {}
    for share in (0.0, 0.5, 1.0):
        tr.disable_gradient_checkpointing()
        sample.checkpoint_blocks(m, share)
        runs.update(dict.fromkeys(runs, 0))
        sample.velocity(m, x, sig, cond).square().mean().backward()
        grads[share] = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        twice = {k for k, n in runs.items() if n == 2}
        assert set(runs.values()) <= {1, 2}
        # 2 main layers, 1 refiner each: share 0.5 -> layers.0 only (round(0.5) = 0 for the lists of one)
        assert twice == {0.0: set(), 0.5: {'layers.0'}, 1.0: set(blocks)}[share], (share, runs)
    for share in (0.5, 1.0):
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads[share], grads[0.0]))
    assert max(g.abs().max().item() for g in grads[0.0]) > 0


def test_lora_input_cast_off_under_autocast_changes_nothing(t2i_dir):
    """add_lora(autocast=True) skips peft's copy of each input to the fp32 LoRA weights' dtype: under autocast the
    LoRA matmuls run in bf16 either way, so the velocity is bit-for-bit the same (bf16 weights, fp32 LoRA, as train.py)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    out = []
    for cast_off in (False, True):
        m = sample.load_model(t2i_dir('zimage'))
        m.transformer.to(torch.bfloat16)
        torch.manual_seed(0)
        params = sample.add_lora(m, 4, 4, autocast=cast_off)
        torch.manual_seed(1)
        for p in params:
            p.data = torch.randn_like(p, dtype=torch.float32) * 0.3    # LoRA weights in fp32, as train.py keeps them
        layers = [mod for mod in m.transformer.modules() if isinstance(mod, BaseTunerLayer)]
        assert layers and all(mod.cast_input_dtype_enabled is not cast_off for mod in layers)
        cond = sample.encode(m, ['a red dog'])
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out.append(sample.velocity(m, torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
                                       .to(torch.bfloat16), torch.tensor([0.5]), cond).float())
    assert out[0].abs().max() > 0 and torch.equal(out[0], out[1])


@pytest.mark.skipif(not (shutil.which('c++') or shutil.which('g++')), reason="torch.compile on CPU needs a C++ compiler")
def test_compile_blocks_matches_eager(t2i_dir):
    """compile = True (torch.compile of each block) gives the eager velocity and LoRA gradient through train.py's
    mix of calls on a GPU (checkpointed update, the KL reference with the LoRA off, CFG-batched rollouts, two
    caption lengths), and no block falls back to eager at torch's recompile limit."""
    torch._dynamo.reset()
    ms = [sample.load_model(t2i_dir('zimage')) for _ in range(2)]
    for m in ms:
        torch.manual_seed(0)
        sample.add_lora(m, 4, 4)
        with torch.no_grad():
            for n, p in m.transformer.named_parameters():
                if 'lora_B' in n:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
        sample.checkpoint_blocks(m, 1.0)                            # train.py's default on a GPU
    sample.compile_blocks(ms[1])
    assert all(b._compiled_call_impl is not None for blocks in sample.block_lists(ms[1]) for b in blocks)
    x, sig = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 0.8])
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for prompts in (['a red dog', 'a blue cat'], ['a red dog and a blue cat on the grass', 'hello']):
            outs = []
            for m in ms:
                cond = sample.encode(m, prompts)
                v = sample.velocity(m, x, sig, cond)                # the update: forward, backward (recompute)
                v.square().mean().backward()
                grads = [p.grad.clone() for p in m.transformer.parameters() if p.requires_grad]
                m.transformer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    m.transformer.disable_adapters()                # the KL reference
                    ref = sample.velocity(m, x, sig, cond)
                    m.transformer.enable_adapters()
                    roll = sample.velocity(m, torch.cat([x, x]), torch.cat([sig, sig]), sample.cat([cond, cond]))
                outs.append((v.detach(), ref, roll, grads))
            (v0, ref0, roll0, g0), (v1, ref1, roll1, g1) = outs
            assert (v0 - ref0).abs().max() > 1e-3                  # the LoRA does something
            for a, b in ((v1, v0), (ref1, ref0), (roll1, roll0)):
                assert torch.allclose(a, b, atol=1e-5)
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g1, g0))
