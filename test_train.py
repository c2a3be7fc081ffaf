"""train.py's tests: whole iterations through the real script (a subprocess), tiny models, CPU; each compared
with an independent recomputation, another run (ranks, resume) or a closed form."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import awm
import reward
import sample

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='session')
def tiny_run(t2i_dir, vlm_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp('prompts')
    with open(d / 'p.jsonl', 'w') as f:
        for t in ['a red dog', 'a blue cat', 'green monkey dance', 'hello world', 'a photo of a cat', 'bad quality']:
            f.write(json.dumps({'prompt': t}) + '\n')
    f.close()

    def args(family='zimage', **kw):
        base = dict(model=t2i_dir(family), vlm=vlm_dir('qwen3'), prompts=str(d / 'p.jsonl'), prompts_per_iter=2,
                    images_per_prompt=4, rollout_steps=3, resolution=32, batch_size=4, micro_batch=2,
                    train_timesteps=2, epochs_per_iter=2, lora_rank=4, lora_alpha=8, max_iters=2, save_every=1,
                    sample_every=0, lr=1e-3, seed=3)
        base.update(kw)
        return [f'--{k}={v}' for k, v in base.items()]
    return args


def run_train(argv, nproc=1):
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']  # a free port
           if nproc > 1 else [sys.executable]) + [os.path.join(HERE, 'train.py')] + argv
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600,  # faulthandler: a native abort
                       env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONFAULTHANDLER='1'))  # prints the Python stack
    assert p.returncode == 0, p.stdout[-1500:] + '\n' + p.stderr[-4000:]
    return p.stdout


def lora_of(run_dir):
    return load_file(os.path.join(run_dir, 'ckpt', 'lora.safetensors'))


@pytest.mark.parametrize('family', ['zimage', 'qwenimage'])
def test_train_full_iteration(family, tiny_run, tmp_path):
    out = str(tmp_path / 'run')
    run_train(tiny_run(family, out_dir=out, sample_every=2))
    rows = [json.loads(l) for l in open(os.path.join(out, 'log.jsonl'))]
    assert [r['iter'] for r in rows] == [0, 1]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ('reward_mean', 'loss', 'policy', 'grad_norm', 'mse'))
        assert r['reward_min'] <= r['reward_mean'] <= r['reward_max'] < 0     # a mean log-prob
    lora = lora_of(out)
    assert any(k.endswith('lora_B.weight') and v.abs().max() > 0 for k, v in lora.items())  # B left zero-init
    assert json.load(open(os.path.join(out, 'config.json')))['lora_rank'] == 4
    for f in ('curves.png', 'samples/iter_00002.png'):
        assert os.path.isfile(os.path.join(out, f))
    m = sample.load_model(tiny_run(family)[0].split('=', 1)[1])      # the checkpoint is a diffusers-loadable LoRA
    base, _ = sample.generate(m, ['a red dog'], [1], 3, 4.0, 32, 32)
    sample.load_lora(m, os.path.join(out, 'ckpt', 'lora.safetensors'))
    tuned, _ = sample.generate(m, ['a red dog'], [1], 3, 4.0, 32, 32)
    assert (tuned - base).abs().max() > 1e-6


def _rank_seed(*parts):
    """train.py's documented derivation of every random draw from (seed, iteration, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _redo_iteration(m, vm, vp, rows, seed, it, G=2, K=4, T=2, steps=3, cfg=3.0, size=32):
    """Iteration `it` of train.py redone from its documented seeds with m's current weights, the paper's
    equations written out: rollouts, PromptEcho rewards, A = (r - mean_g) / (std_g + 1e-4), x_sigma =
    (1 - s) x0 + s eps, target eps - x0 (epoch 0's draws). -> rewards [G, K] and, one row per (rollout,
    timestep): advantages, x_sigma, target, sigma, prompt conditioning. One thread, as the run under test
    (OMP_NUM_THREADS=1): the images round to uint8 for the VLM, so the sums must agree bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        picks = np.random.default_rng([seed, it]).choice(len(rows), G, replace=False)
        prompts = [rows[picks[j // K]]['prompt'] for j in range(G * K)]
        images, x0 = sample.generate(m, prompts, [_rank_seed(seed, it, j) for j in range(G * K)], steps, cfg, size, size,
                                     '', 8)
        r = reward.promptecho_reward(vm, vp, images, prompts).view(G, K)
        cond = sample.encode(m, [p for p in prompts for _ in range(T)])
    finally:
        torch.set_num_threads(threads)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).flatten()
    sigmas = sample.sigma_schedule(m, steps, size, size)
    sig = torch.cat([awm.sample_train_sigmas(sigmas, 1, T, 0.9, True, torch.Generator().manual_seed(
        _rank_seed(seed, it, 0, j, 3)))[0] for j in range(G * K)])                        # [G*K*T]
    eps = torch.cat([torch.randn(T, *x0.shape[1:], generator=torch.Generator().manual_seed(_rank_seed(seed, it, 0, j, 2)))
                     for j in range(G * K)])                                             # [G*K*T, C, h, w]
    x0r, s4 = x0.repeat_interleave(T, 0), sig.view(-1, 1, 1, 1)
    return r, adv.repeat_interleave(T), (1 - s4) * x0r + s4 * eps, eps - x0r, sig, cond


@pytest.mark.parametrize('family,train_cfg', [('zimage', False), ('zimage', True), ('qwenimage', False)])
def test_train_iteration_equals_a_recomputation(family, train_cfg, tiny_run, vlm_dir, tmp_path):
    # Iteration 0 of train.py against _redo_iteration and L = mean(A ||v - target||^2). LoRA B starts at 0, so
    # the first step's gradient reaches B only (A keeps its init, read back from the checkpoint), and Adam's
    # first step is B = -lr g / (|g| + 1e-8).
    out, seed, lr = str(tmp_path / 'run'), 3, 1e-3
    run_train(tiny_run(family, out_dir=out, max_iters=1, epochs_per_iter=1, batch_size=8, micro_batch=2,
                       grad_clip=0.0, weight_decay=0.0, lr=lr, train_cfg=train_cfg, rollout_cfg=3.0, seed=seed))
    row = json.loads(open(os.path.join(out, 'log.jsonl')).readline())
    m = sample.load_model(tiny_run(family)[0].split('=', 1)[1])
    vm, vp = reward.load_vlm(vlm_dir('qwen3'))
    r, adv, x_sig, target, sig, cond = _redo_iteration(m, vm, vp, sample.read_prompts(tiny_run()[2].split('=', 1)[1]),
                                                       seed, 0)
    assert abs(row['reward_mean'] - r.mean().item()) < 1e-5
    sample.load_lora(m, os.path.join(out, 'ckpt', 'lora.safetensors'))
    params = {n: p for n, p in m.transformer.named_parameters() if 'lora_' in n}
    saved_b = {n: p.detach().clone() for n, p in params.items() if 'lora_B' in n}
    with torch.no_grad():
        for n in saved_b:
            params[n].zero_()                                     # the LoRA as it started: B = 0, A as saved
    for p in params.values():
        p.requires_grad_(True)
    v = sample.velocity(m, x_sig, sig, cond)
    if train_cfg:                                                 # Z-Image guidance, the rollouts' field
        v_u = sample.velocity(m, x_sig, sig, sample.take(sample.encode(m, ['']), [0] * len(sig)))
        v = v + 3.0 * (v - v_u)
    mse = (v - target).pow(2).flatten(1).mean(1)
    policy = (adv * mse).mean()
    policy.backward()
    assert abs(row['mse'] - mse.mean().item()) < 1e-4 * mse.mean().item()
    assert abs(row['policy'] - policy.item()) < 1e-4 * mse.mean().item()
    gnorm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values() if p.grad is not None)).item()
    assert abs(row['grad_norm'] - gnorm) < 1e-3 * gnorm
    for n, b in saved_b.items():
        g = params[n].grad
        if g is None or g.abs().max() == 0:                       # feeds nothing the loss sees (Qwen-Image's last
            assert b.abs().max() == 0, n                          # text-stream output): Adam leaves it at 0
            continue
        sure = g.abs() > 1e-3 * g.abs().max()                     # (a gradient ~0 may flip sign by summation order)
        assert torch.allclose(b[sure], -lr * g[sure] / (g[sure].abs() + 1e-8), atol=lr * 1e-2, rtol=0), n
        assert sure.float().mean() > 0.9 and b.abs().max() <= lr * 1.01


def test_train_later_iterations_roll_out_the_policy_and_anchor_to_the_base(tiny_run, vlm_dir, tmp_path):
    # Iteration 1, resumed from iteration 0's checkpoint, one optimizer step per iteration: its rollouts are
    # drawn by that checkpoint's LoRA policy, every micro-batch sees those weights, and the KL term's
    # reference is the model with the LoRA off: kl = mean ||v_lora - v_base||^2 over _redo_iteration's rows
    out, seed = str(tmp_path / 'run'), 3
    kw = dict(out_dir=out, epochs_per_iter=1, batch_size=8, micro_batch=2, beta=0.5, seed=seed, rollout_cfg=3.0, lr=3e-2)
    run_train(tiny_run(max_iters=1, **kw))
    lora1 = str(tmp_path / 'lora1.safetensors')
    shutil.copy(os.path.join(out, 'ckpt', 'lora.safetensors'), lora1)
    run_train(tiny_run(max_iters=2, resume=True, **kw))
    row = [json.loads(l) for l in open(os.path.join(out, 'log.jsonl'))][1]
    m = sample.load_model(tiny_run()[0].split('=', 1)[1])
    vm, vp = reward.load_vlm(vlm_dir('qwen3'))
    rows = sample.read_prompts(tiny_run()[2].split('=', 1)[1])
    r_base = _redo_iteration(m, vm, vp, rows, seed, 1)[0]
    sample.load_lora(m, lora1)
    r, adv, x_sig, target, sig, cond = _redo_iteration(m, vm, vp, rows, seed, 1)
    assert abs(row['reward_mean'] - r.mean().item()) < 1e-5 < abs(row['reward_mean'] - r_base.mean().item())
    with torch.no_grad():
        v = sample.velocity(m, x_sig, sig, cond)
        m.transformer.disable_adapters()
        v_base = sample.velocity(m, x_sig, sig, cond)
        m.transformer.enable_adapters()
    kl = (v - v_base).pow(2).flatten(1).mean(1).mean().item()
    policy = (adv * (v - target).pow(2).flatten(1).mean(1)).mean().item()
    assert kl > 0 and abs(row['kl'] - kl) < 1e-3 * kl
    assert abs(row['policy'] - policy) < 1e-4 * row['mse']


def test_train_two_processes_equal_one(tiny_run, tmp_path):
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    run_train(tiny_run(out_dir=one, micro_batch=1))               # 1 rank: 4 micro-steps of 1 per step
    run_train(tiny_run(out_dir=two, micro_batch=1), nproc=2)      # 2 ranks: 2 micro-steps each, grads averaged
    a, b = lora_of(one), lora_of(two)
    assert a.keys() == b.keys()
    for k in a:  # Adam moves each weight by ~lr = 1e-3 per step, so a wrong gradient shows at >= 1e-4;
        # summation order across ranks differs in float32 and Adam's 1/sqrt(v) amplifies it to ~1e-5
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=0), (k, (a[k] - b[k]).abs().max())
    rows1 = [json.loads(l) for l in open(os.path.join(one, 'log.jsonl'))]
    rows2 = [json.loads(l) for l in open(os.path.join(two, 'log.jsonl'))]
    assert abs(rows1[0]['reward_mean'] - rows2[0]['reward_mean']) < 1e-6   # the same rollouts, on other ranks
    for k in ('reward_mean', 'grad_norm', 'mse'):                 # and the same gradient (later rollouts follow
        assert np.allclose([r[k] for r in rows1], [r[k] for r in rows2], rtol=1e-3, atol=1e-7), k   # the weights)


def test_train_group_noise_is_the_groups_on_every_rank(tiny_run, tmp_path):
    # 3 prompts x 2 images over two ranks: rank 0 holds images 0-2 (groups 0, 0, 1), rank 1 images 3-5
    # (groups 1, 2, 2), so group 1 is split over the ranks and rank 1's local positions are not its
    # groups. With group_noise every rank must draw each image's noise from its global group, so the
    # two runs train the same LoRA; and that noise is other noise than the per-image draws.
    kw = dict(prompts_per_iter=3, images_per_prompt=2, batch_size=6, micro_batch=1, max_iters=1)
    one, two, own = str(tmp_path / 'one'), str(tmp_path / 'two'), str(tmp_path / 'own')
    run_train(tiny_run(out_dir=one, group_noise=True, **kw))
    run_train(tiny_run(out_dir=two, group_noise=True, **kw), nproc=2)
    run_train(tiny_run(out_dir=own, group_noise=False, **kw))
    a, b, c = lora_of(one), lora_of(two), lora_of(own)

    def moved(x, y):  # fraction of LoRA weights that differ by more than 1e-4
        return sum((x[k] - y[k]).abs().gt(1e-4).sum().item() for k in x) / sum(v.numel() for v in x.values())
    # Adam's first steps move a weight by ~lr * sign(grad): where a gradient is ~0, float32 summation order
    # over the ranks flips a few signs; noise drawn from another seed moves a large share of the weights
    assert moved(a, b) < 0.01, moved(a, b)
    assert moved(a, c) > 0.1, moved(a, c)


def test_train_cfg_trains_the_guided_velocity(tiny_run, tmp_path):
    # Z-Image guidance: v = v_c + g (v_c - v_u). With the prompt as its own negative prompt v_u = v_c, so the
    # guided field and its gradient (1 + g) grad v_c - g grad v_u are v_cond's: train_cfg must change nothing.
    # With another negative prompt the guided field differs from v_cond, and so must the trained LoRA.
    same = tmp_path / 'same.jsonl'
    same.write_text(json.dumps({'prompt': 'a red dog'}) + '\n' + json.dumps({'prompt': 'a red dog'}) + '\n')
    lora = {}
    for neg in ('a red dog', 'bad quality'):
        for tc in (False, True):
            out = str(tmp_path / f'{neg.split()[0]}_{tc}')
            run_train(tiny_run(out_dir=out, prompts=str(same), negative_prompt=neg, train_cfg=tc, rollout_cfg=3.0,
                               beta=0.5, max_iters=1))
            lora[neg, tc] = lora_of(out)
    a, b = lora['a red dog', False], lora['a red dog', True]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=0), (k, (a[k] - b[k]).abs().max())
    a, b = lora['bad quality', False], lora['bad quality', True]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-3     # ~lr: the update followed another field


def test_train_ratio_form_uses_the_rollout_policy(tiny_run, tmp_path):
    # one optimizer step per iteration (8 rollouts, batch 8, 1 epoch): on-policy, so the ratio/clip form
    # trains the same LoRA as plain AWM. With a second epoch its step is off-policy: the ratio to the
    # rollout policy is no longer 1 and re-weights each row, so the LoRA must differ from plain AWM's.
    lora = {}
    for epochs in (1, 2):
        for clip in (0.0, 1e6):
            out = str(tmp_path / f'e{epochs}_c{clip}')
            run_train(tiny_run(out_dir=out, batch_size=8, epochs_per_iter=epochs, clip_range=clip, max_iters=1))
            lora[epochs, clip] = lora_of(out)
    a, b = lora[1, 0.0], lora[1, 1e6]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    a, b = lora[2, 0.0], lora[2, 1e6]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-5


def test_train_exact_resume(tiny_run, tmp_path):
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    run_train(tiny_run(out_dir=full, max_iters=4))
    run_train(tiny_run(out_dir=part, max_iters=2))                # "killed" after iteration 2 ...
    log = os.path.join(part, 'log.jsonl')
    rows = open(log).readlines()
    open(log, 'w').writelines(rows[:1])                           # ... between the checkpoint and the log write
    ckpt = os.path.join(part, 'ckpt')                             # ... and between the checkpoint's two renames: the
    shutil.copytree(ckpt, ckpt + '.old')                          # older checkpoint (here a broken one) is in .old,
    open(os.path.join(ckpt + '.old', 'state.pt'), 'w').write('older')
    os.replace(ckpt, ckpt + '.tmp')                               # the complete newer one still in .tmp
    run_train(tiny_run(out_dir=part, max_iters=4, resume=True))
    a, b = lora_of(full), lora_of(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k                         # bit-identical at k + 2
    assert [json.loads(l)['iter'] for l in open(os.path.join(part, 'log.jsonl'))] == [0, 1, 2, 3]
    p = subprocess.run([sys.executable, 'train.py'] + tiny_run(out_dir=part, max_iters=1), cwd=HERE,
                       capture_output=True, text=True)            # a fresh start must not overwrite a run
    assert p.returncode != 0 and 'holds a checkpoint: pass --resume=True' in p.stderr
    assert all(torch.equal(lora_of(part)[k], b[k]) for k in b) and len(open(os.path.join(part, 'log.jsonl')).readlines()) == 4
    os.replace(ckpt, ckpt + '.tmp')                               # killed before its first save's last rename:
    p = subprocess.run([sys.executable, 'train.py'] + tiny_run(out_dir=part, max_iters=1), cwd=HERE,
                       capture_output=True, text=True)            # still a run, refused
    assert p.returncode != 0 and 'holds a checkpoint: pass --resume=True' in p.stderr


def test_train_resume_with_ema_newly_on_starts_it_at_the_resumed_weights(tiny_run, tmp_path):
    # one optimizer step per iteration, after all its micro-batches: in the first iteration after the resume
    # every micro-batch sees the EMA equal to the weights, so the EMA term is exactly 0 (an EMA left at the
    # LoRA's initial weights would pull the resumed LoRA back to its start)
    out = str(tmp_path / 'run')
    kw = dict(out_dir=out, batch_size=8, micro_batch=2, epochs_per_iter=1)
    run_train(tiny_run(max_iters=2, **kw))
    run_train(tiny_run(max_iters=3, resume=True, ema_beta=1.0, **kw))
    rows = [json.loads(l) for l in open(os.path.join(out, 'log.jsonl'))]
    assert [r['iter'] for r in rows] == [0, 1, 2] and 'ema' not in rows[1]
    assert rows[2]['ema'] == 0.0


def test_train_ema_is_updated_once_per_iteration(tiny_run, tmp_path):
    # as the official code: the EMA moves after the iteration's update, so within an iteration it is the policy
    # before it. Two optimizer steps, decay 0: the second step's weights differ from the EMA (term > 0); an EMA
    # updated per optimizer step would equal the weights at every micro-batch (term exactly 0)
    out = str(tmp_path / 'run')
    run_train(tiny_run(out_dir=out, batch_size=4, epochs_per_iter=1, ema_beta=1.0, ema_decay=0.0, max_iters=1))
    row = json.loads(open(os.path.join(out, 'log.jsonl')).readline())
    assert row['ema'] > 0
    ema = torch.load(os.path.join(out, 'ckpt', 'state.pt'), weights_only=True)['ema']
    lora = lora_of(out)                                           # decay 0: after the iteration the EMA is the LoRA
    assert sorted(round(e.double().abs().sum().item(), 6) for e in ema) == \
        sorted(round(v.double().abs().sum().item(), 6) for v in lora.values())


def test_train_nan_reward_skips_update(tiny_run, tmp_path):
    out = str(tmp_path / 'nan')
    stdout = run_train(tiny_run(out_dir=out, reward_fn='conftest:nan_reward'))
    assert 'update skipped on every rank' in stdout
    rows = [json.loads(l) for l in open(os.path.join(out, 'log.jsonl'))]
    assert [r['skipped'] for r in rows] == [1, 2]
    lora = lora_of(out)
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert all(v.abs().max() == 0 for k, v in lora.items() if 'lora_B' in k)  # never updated: B still zero


def test_train_inferscore_reads_the_vlms_rating(tiny_run, vlm_dir, tmp_path):
    # The paper's InferScore ablation: the VLM writes a rating, train.py parses it into the reward. A VLM whose
    # generation config allows one token, which also ends the answer, answers "5" (or "a") to every image,
    # whatever its random weights: rewards of exactly 5, or unparsable answers that get advantage 0.
    tok = reward.load_processor(vlm_dir('qwen3')).tokenizer
    for answer, want_reward, want_unparsed in (('5', 5.0, 0.0), ('a', 0.0, 1.0)):
        d = tmp_path / f'vlm_{answer}'
        shutil.copytree(vlm_dir('qwen3'), d)
        only = tok.convert_tokens_to_ids(answer)
        gen = json.loads((d / 'generation_config.json').read_text()) if (d / 'generation_config.json').exists() else {}
        gen.update(eos_token_id=only, pad_token_id=0, suppress_tokens=[i for i in range(len(tok)) if i != only])
        (d / 'generation_config.json').write_text(json.dumps(gen))
        out = str(tmp_path / f'run_{answer}')
        run_train(tiny_run(out_dir=out, vlm=str(d), reward_fn='inferscore', beta=0.0))
        rows = [json.loads(l) for l in open(os.path.join(out, 'log.jsonl'))]
        assert [(r['reward_mean'], r['unparsed'], r['skipped']) for r in rows] == [(want_reward, want_unparsed, 0)] * 2
        assert all(r['adv_abs_mean'] == 0.0 and r['policy'] == 0.0 for r in rows)   # equal ratings: nothing to learn


def test_train_bad_config(tiny_run, tmp_path):
    p = subprocess.run([sys.executable, 'train.py', '--lora_rnak=4'], cwd=HERE, capture_output=True, text=True)
    assert p.returncode != 0 and 'unknown config key --lora_rnak; did you mean --lora_rank?' in p.stderr
    p = subprocess.run([sys.executable, 'train.py', '--lr=fast'], cwd=HERE, capture_output=True, text=True)
    assert p.returncode != 0 and 'expected float' in p.stderr
    p = subprocess.run([sys.executable, 'train.py', 'config/nope.py'], cwd=HERE, capture_output=True, text=True)
    assert p.returncode != 0 and 'not found' in p.stderr
    p = subprocess.run([sys.executable, 'train.py'] + tiny_run(batch_size=3), cwd=HERE, capture_output=True, text=True)
    assert p.returncode != 0 and 'batch_size=3 must divide' in p.stderr
    p = subprocess.run([sys.executable, 'train.py'] + tiny_run(reward_fn='clip'), cwd=HERE, capture_output=True, text=True)
    assert p.returncode != 0 and "use 'promptecho', 'inferscore', 'random' or 'module:function'" in p.stderr
    p = subprocess.run([sys.executable, 'train.py'] + tiny_run(reward_fn='nomod:fn'), cwd=HERE, capture_output=True, text=True)
    assert p.returncode != 0 and "cannot load 'nomod:fn'" in p.stderr
    bad = dict(save_every=0, batch_size=0, micro_batch=0, rollout_steps=1, timestep_frac=1.5, dtype='bf16')
    p = subprocess.run([sys.executable, 'train.py'] + tiny_run(**bad), cwd=HERE, capture_output=True, text=True)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    for msg in ('save_every=0 must be >= 1', 'batch_size=0 must be >= 1', 'micro_batch=0 must be >= 1',
                'rollout_steps=1 must be >= 2', 'timestep_frac=1.5 must be in (0, 1]', "dtype='bf16': use"):
        assert msg in p.stderr, (msg, p.stderr)
    p = subprocess.run([sys.executable, 'train.py'] + tiny_run(reward_fn='conftest:one_reward', out_dir=str(tmp_path / 'r')),
                       cwd=HERE, capture_output=True, text=True)
    assert p.returncode != 0 and 'returned shape (1,) for 8 images' in p.stderr and 'Traceback' not in p.stderr


def test_train_full_finetune(tiny_run, tmp_path):
    out, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    run_train(tiny_run(out_dir=out, lora_rank=0, max_iters=1, lr=1e-4))
    tuned = load_file(os.path.join(out, 'ckpt', 'transformer.safetensors'))
    base = sample.load_model(tiny_run()[0].split('=', 1)[1]).transformer.state_dict()
    assert tuned.keys() == base.keys()
    # 4 Adam steps (2 epochs x 2 steps) move each weight by at most ~4 lr, and most weights move at all
    moved = [(tuned[k] - base[k]).abs() for k in base]
    assert max(d.max().item() for d in moved) <= 4e-4 * 1.01
    assert sum((d > 0).sum().item() for d in moved) / sum(d.numel() for d in moved) > 0.5
    run_train(tiny_run(out_dir=out, lora_rank=0, max_iters=2, lr=1e-4, resume=True))
    run_train(tiny_run(out_dir=part, lora_rank=0, max_iters=2, lr=1e-4))    # uninterrupted
    a = load_file(os.path.join(out, 'ckpt', 'transformer.safetensors'))
    b = load_file(os.path.join(part, 'ckpt', 'transformer.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a)                          # exact resume of full fine-tuning
