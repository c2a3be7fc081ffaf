"""
PromptEcho + AWM: RL fine-tuning of a flow-matching text-to-image model.

    python train.py config/toy.py                       # the toy world, 2 CPU cores
    torchrun --nproc_per_node 8 train.py config/zimage.py
    python train.py config/zimage.py --lr=3e-5 --resume=True

One iteration: ROLLOUT (the policy draws K images per prompt with a deterministic Euler ODE)
-> REWARD (a frozen VLM scores each image by how well it "echoes" the prompt) -> ADVANTAGES
(within each prompt's group) -> UPDATE (advantage-weighted flow matching on the policy's own
samples, a few epochs) -> LOG / CHECKPOINT. The defaults below are the PromptEcho paper's.
"""
import ast
import difflib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

import awm
import reward
import sample

# -----------------------------------------------------------------------------
# constants: the paper's defaults. Override with config/NAME.py and --key=value.
# I/O
out_dir = 'out/run'        # checkpoints, logs, grids, curves
model = ''                 # diffusers dir of the policy: Z-Image / Qwen-Image / SD3.5 / FLUX.1 (paper: Z-Image, Qwen-Image-2512)
vlm = ''                   # transformers dir of the frozen reward VLM (paper: Qwen3-VL-32B-Instruct; 8B works, weaker)
prompts = ''               # training prompts, .jsonl ({"prompt", "label"?, "query"?}) or .txt (paper: ~100K VLM captions)
eval_prompts = ''          # held-out prompts for the periodic eval (never trained on); '' = no eval
max_iters = 400            # RL iterations; not given in the paper (Z-Image ran ~100 h on 32 H20)
seed = 1337                # every random draw derives from (seed, iteration, sample index): world-size independent
# ROLLOUT
prompts_per_iter = 32      # unique prompts per iteration (paper: 32)
images_per_prompt = 8      # group size K (paper: 8); more = better advantage estimates, more rollout time
rollout_steps = 30         # Euler ODE steps (paper: 30); fewer = faster, blurrier x0
rollout_cfg = 3.5          # classifier-free guidance in rollouts (paper: 3.5); eval uses 4.0
resolution = 1024          # square side in pixels (paper: 1024); cost grows ~quadratically
negative_prompt = ''       # the unconditional branch of CFG
rollout_batch = 8          # images per sampler forward per rank (memory knob, no effect on the result)
# REWARD
reward_fn = 'promptecho'   # 'promptecho' | 'inferscore' (paper's ablation: the VLM generates a 0-10 rating)
                           # | 'random' (control: must not learn) | 'module:function'(images[B,3,H,W], rows) -> [B]
reward_batch = 8           # images per VLM forward (memory knob)
vlm_max_pixels = 1024 * 1024  # VLM input resolution cap; 1024^2 = 4096 vision tokens before merging
# ADVANTAGES
adv_std_norm = True        # A = (r - mean) / (std + eps) (paper); False: A = r - mean (PromptEcho README)
adv_clip = 5.0             # clamp |A| (official AWM: 5); 0 = off
adv_positive_only = False  # True: A <- max(A, 0), learn only from the better-than-mean images (not in the paper)
# UPDATE (AWM)
epochs_per_iter = 4        # passes over each rollout batch (paper: 4); more = more off-policy drift
batch_size = 128           # rollouts per optimizer step, all ranks (paper: 128) -> 2 steps per epoch
micro_batch = 2            # rollouts per forward per rank; gradient accumulation fills batch_size
train_timesteps = 6        # noise levels per rollout per update (official AWM: 6); more = less noisy gradient, slower
timestep_frac = 0.9        # train on the noisiest fraction of the rollout grid (official dgx configs: 0.9), sigma=1 skipped
stratified = True          # one noise level per stratum of the grid (official) vs uniform draws
group_noise = False        # True: the K images of a prompt share their training noise eps and levels sigma (common
                           # random numbers, as Diffusion-DPO's pairs): the shared part of sum_k A_k grad mse_k's noise
                           # cancels within an optimizer step (all of a group's images share one when batch_size = G*K)
ghuber_weighting = False   # True: the matching loss is the official code's ghuber(MSE, sigma); False: the MSE (paper)
train_cfg = False          # True: AWM trains the guided velocity the rollouts used, not v_cond (official train.cfg;
                           # 2x the update's forward cost and memory; FLUX: no effect, its guidance is an input)
clip_range = 0.0           # > 0: the official PPO ratio/clip form (official configs: 1), ratio = pi_theta / pi_rollout;
                           # equal to plain AWM until the first optimizer step of an iteration, then one more
                           # no-grad forward per micro-batch with the rollout policy's weights (kept in memory)
beta = 0.0                 # KL to the reference (LoRA off), beta*||v - v_ref||^2 (official: 1e-3..3e-3, with its
                           # advantages rescaled to [-1, 1]; ours reach +-adv_clip, so the same beta is ~5x weaker)
ema_beta = 0.0             # pull toward an EMA of the trained weights, ema_beta*||v - v_ema||^2
ema_decay = 0.95           # EMA decay per iteration: updated once, after the update (as the official code; its
                           # dgx configs: 0.3, warmed up as min(0.3, 0.001 * optimizer steps))
lr = 5e-5                  # AdamW learning rate (paper: 5e-5; official AWM SD3.5: 3e-4)
weight_decay = 1e-4        # AdamW weight decay (official AWM: 1e-4)
grad_clip = 1.0            # max global grad norm (official AWM: 1.0); 0 = off
lora_rank = 64             # LoRA rank (paper: 64); 0 = train the full transformer
lora_alpha = 128           # LoRA alpha (paper: 128); the update scale is alpha / rank
# SYSTEM
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # weights and autocast dtype
grad_checkpointing = float(torch.cuda.is_available())  # share of transformer blocks recomputed in the update's
                           # backward (1: all, 0: none): less activation memory for ~1/3 more compute per block
compile = False            # torch.compile each transformer block (GPU): update 1.44x, rollout 1.40x faster on an H200;
                           # 20-40 s of compiling, more as caption lengths vary (config/zimage.py turns it on)
vlm_on_gpu = True          # False: the VLM waits on the CPU outside the REWARD phase
text_encoder_on_gpu = True # False: the text encoder(s) wait on the CPU outside prompt encoding
vae_on_gpu = True          # False: the VAE waits on the CPU outside decoding
# LOG / CHECKPOINT
sample_every = 10          # save a grid of fixed prompts every N iterations (0 = never)
save_every = 10            # checkpoint (atomic, exact resume) every N iterations, and at the end
eval_every = 0             # evaluate eval_prompts every N iterations (0 = only at start and end), with the
                           # rollout's steps and CFG (a monitor; eval.py judges at the paper's eval settings)
eval_metric = ''           # 'module:function'(image uint8 [H,W,3], prompt) -> float, e.g. the toy detector
eval_n = 64                # held-out prompts used by the eval
resume = False             # continue from out_dir's latest checkpoint, exactly
wandb_log = False          # also log to wandb (optional, needs the package)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]


def apply_overrides(argv, scope):
    """nanoGPT's configurator: config files are exec'd, --key=value must name a known key and keep its type."""
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                sys.exit(f"config file {arg!r} not found (configs live in config/, e.g. config/toy.py)")
            exec(open(arg).read(), scope)
            continue
        key, _, val = arg[2:].partition('=')
        if key not in config_keys:
            near = difflib.get_close_matches(key, config_keys, n=1)
            sys.exit(f"unknown config key --{key}" + (f"; did you mean --{near[0]}?" if near else ""))
        try:
            val = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            pass                                              # plain strings need no quotes
        if type(val) is not type(scope[key]) and not (isinstance(scope[key], float) and isinstance(val, int)):
            sys.exit(f"--{key}={val!r}: expected {type(scope[key]).__name__} like the default {scope[key]!r}")
        scope[key] = type(scope[key])(val)
    for k in config_keys:                                     # config files must not invent keys either
        if k not in scope:
            sys.exit(f"config removed key {k}")
    unknown = [k for k, v in scope.items() if not k.startswith('_') and k not in config_keys
               and isinstance(v, (int, float, bool, str)) and k not in _startup_names]
    if unknown:
        near = difflib.get_close_matches(unknown[0], config_keys, n=1)
        sys.exit(f"unknown config key {unknown[0]!r} in a config file" + (f"; did you mean {near[0]!r}?" if near else ""))


def load_fn(spec):
    """'module:function' -> the function (for reward_fn / eval_metric plug-ins such as the toy detector)."""
    import importlib
    mod, _, fn = spec.partition(':')
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        sys.exit(f"cannot load {spec!r} ({e}); expected 'module:function', e.g. 'toy:detector_reward'")


def rank_seed(*parts):
    """A 63-bit seed from a tuple of ints: the same on every rank and for any world size."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def swapped(params, weights, fn):
    """fn() with other weights (EMA, rollout policy) swapped into params, then swapped back."""
    for p, w in zip(params, weights):
        p.data, w.data = w.data, p.data
    torch.clear_autocast_cache()                             # else autocast reuses the casts of the other weights
    try:
        return fn()
    finally:
        for p, w in zip(params, weights):
            p.data, w.data = w.data, p.data
        torch.clear_autocast_cache()


def all_reduce_mean_(tensors, world):
    """Average tensors over ranks through one flat buffer: what DDP does for gradients, written out."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for t in tensors:
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()


def gather(x, world):
    """Concatenate a 1-D tensor from every rank, in rank order."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plot_curves(rows, keys, path, size=(640, 360)):
    """A small line chart (PIL only) of log columns against iterations done. Evals run after their
    row's update, so they sit at iter + 1, and the base eval (key + '_base') at 0."""
    from PIL import Image, ImageDraw
    img = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(img)
    colors = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd']
    x0, y0, x1, y1 = 50, 20, size[0] - 20, size[1] - 40
    d.rectangle([x0, y0, x1, y1], outline='black')
    xmax = max([r['iter'] + 1 for r in rows] + [1])
    d.text((x0, y0 - 14), 'iteration 0', fill='black')
    d.text((x1 - 70, y0 - 14), f'iteration {xmax}', fill='black')
    ok = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    for c, k in zip(colors, keys):
        shift = 1 if k.startswith('eval_') else 0
        pts = [(0, r[k + '_base']) for r in rows if ok(r.get(k + '_base'))]
        pts += [(r['iter'] + shift, r[k]) for r in rows if ok(r.get(k))]
        if len(pts) < 1:
            continue
        xs, ys = zip(*pts)
        lo, hi = min(ys), max(ys)
        span = (hi - lo) or 1.0
        xy = [(x0 + (x1 - x0) * x / xmax, y1 - (y1 - y0) * (y - lo) / span) for x, y in pts]
        d.line(xy, fill=c, width=2) if len(xy) > 1 else d.ellipse([xy[0][0] - 3, xy[0][1] - 3, xy[0][0] + 3, xy[0][1] + 3], fill=c)
        d.text((x0 + 5, y1 + 5 + 12 * keys.index(k)), f"{k}: {lo:.3f} .. {hi:.3f} (first {ys[0]:.3f}, last {ys[-1]:.3f})", fill=c)
    img.save(path + '.tmp.png')
    os.replace(path + '.tmp.png', path)


_startup_names = set(globals()) | {'_startup_names'}
apply_overrides(sys.argv[1:], globals())
config = {k: globals()[k] for k in config_keys}

# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (multi-node: its own rendezvous)
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    import datetime                                           # long: rank 0 alone runs the eval / sample grid
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo', timeout=datetime.timedelta(hours=2))
    rank, local_rank, world = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
else:
    rank, local_rank, world = 0, 0, 1
master = rank == 0
G, K = prompts_per_iter, images_per_prompt
N = G * K                                                     # rollouts per iteration, all ranks
counts = ('max_iters', 'prompts_per_iter', 'images_per_prompt', 'rollout_batch', 'reward_batch', 'epochs_per_iter',
          'batch_size', 'micro_batch', 'train_timesteps', 'save_every', 'eval_n')
problems = [f"{k}={globals()[k]} must be >= 1" for k in counts if globals()[k] < 1] + [msg for bad, msg in [
    (rollout_steps < 2, f"rollout_steps={rollout_steps} must be >= 2 (AWM trains on the grid's inner noise levels)"),
    (not 0 < timestep_frac <= 1, f"timestep_frac={timestep_frac} must be in (0, 1]"),
    (not 0 <= grad_checkpointing <= 1, f"grad_checkpointing={grad_checkpointing} must be in [0, 1]"),
    (dtype not in ('float32', 'bfloat16', 'float16'), f"dtype={dtype!r}: use 'float32', 'bfloat16' or 'float16'"),
] if bad]
if problems:                                                  # (before the checks below divide by these)
    sys.exit("config error: " + "; ".join(problems))
problems = [msg for bad, msg in [
    (not model, "set model=DIR (a diffusers directory), e.g. --model=out/toy/zimage"),
    (not prompts, "set prompts=FILE (.jsonl or .txt)"),
    (reward_fn in ('promptecho', 'inferscore') and not vlm,
     f"reward_fn={reward_fn!r} needs vlm=DIR (a transformers VLM directory)"),
    (N % world, f"prompts_per_iter*images_per_prompt={N} must divide over {world} ranks"),
    (N % batch_size, f"batch_size={batch_size} must divide the {N} rollouts of an iteration"),
    (batch_size % (world * micro_batch), f"batch_size={batch_size} must be a multiple of world*micro_batch={world * micro_batch}"),
    (beta > 0 and lora_rank == 0, "beta > 0 needs the LoRA (the reference is the model with the LoRA off)"),
    (reward_fn not in ('promptecho', 'inferscore', 'random') and ':' not in reward_fn,
     f"reward_fn={reward_fn!r}: use 'promptecho', 'inferscore', 'random' or 'module:function'"),
] if bad]
if problems:
    sys.exit("config error: " + "; ".join(problems))
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = torch.autocast('cuda', dtype=ptdtype) if device.startswith('cuda') and ptdtype != torch.float32 else nullcontext()
ckpt_dir = os.path.join(out_dir, 'ckpt')
log_path = os.path.join(out_dir, 'log.jsonl')
if master and resume and not os.path.isdir(ckpt_dir):         # killed before the last rename of a save: a ckpt.tmp
    done = os.path.isfile(os.path.join(ckpt_dir + '.tmp', 'state.pt'))   # holding state.pt is complete (written
    if done or os.path.isdir(ckpt_dir + '.old'):              # last, atomically), else .old is the previous save
        os.replace(ckpt_dir + '.tmp' if done else ckpt_dir + '.old', ckpt_dir)
if ddp:
    dist.barrier()                                            # every rank sees the recovered checkpoint
if resume and not os.path.isfile(os.path.join(ckpt_dir, 'state.pt')):
    sys.exit(f"--resume: no checkpoint in {ckpt_dir}" + (" (with several nodes out_dir must be on a shared filesystem)"
                                                         if world > int(os.environ.get('LOCAL_WORLD_SIZE', world)) else ""))
if not resume and any(os.path.isfile(os.path.join(d, 'state.pt')) for d in (ckpt_dir, ckpt_dir + '.tmp', ckpt_dir + '.old')):
    sys.exit(f"{out_dir} holds a checkpoint: pass --resume=True to continue that run, or another --out_dir to start a new one")
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)                                       # the same LoRA init on every rank

# -----------------------------------------------------------------------------
# models: policy (+ LoRA), frozen VLM, optimizer
m = sample.load_model(model, device, ptdtype)
try:
    sample.check_size(m, resolution, resolution)
except ValueError as e:
    sys.exit(f"config error: resolution={resolution}: {e}")
text_encoders = [getattr(m, k) for k in sorted(vars(m)) if k.startswith('text_encoder')]  # SD3: 3, FLUX: 2
train_rows = sample.read_prompts(prompts)
if len(train_rows) < G:
    sys.exit(f"{prompts} has {len(train_rows)} prompts but prompts_per_iter={G}")
if lora_rank > 0:
    params = sample.add_lora(m, lora_rank, lora_alpha, autocast=not isinstance(autocast, nullcontext))
else:
    m.transformer.requires_grad_(True)
    params = list(m.transformer.parameters())
for p in params:
    p.data = p.data.float()                                   # trainable weights and Adam state in fp32
sample.checkpoint_blocks(m, grad_checkpointing)
if compile:
    sample.compile_blocks(m)
optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
ema = [p.detach().clone() for p in params] if ema_beta > 0 else []
old = [p.detach().clone() for p in params] if clip_range > 0 else []   # the rollout policy, refreshed per iteration
vlm_model = processor = None
if reward_fn in ('promptecho', 'inferscore'):
    vlm_model, processor = reward.load_vlm(vlm, device if vlm_on_gpu else 'cpu', ptdtype)
reward_plugin = load_fn(reward_fn) if ':' in reward_fn else None
metric = load_fn(eval_metric) if eval_metric else None
eval_rows = sample.read_prompts(eval_prompts)[:eval_n] if eval_prompts else []
sample.move(text_encoders, device)
neg_cond = sample.encode(m, [negative_prompt])               # the unconditional branch, encoded once
sigmas = sample.sigma_schedule(m, rollout_steps, resolution, resolution)  # [S + 1], 1 -> 0
C, h, w = sample.latent_shape(m, resolution, resolution)

it0, log_rows, skipped, base_eval = 0, [], 0, {}
if resume:
    state = torch.load(os.path.join(ckpt_dir, 'state.pt'), weights_only=True, map_location='cpu')
    if 'log' not in state:
        sys.exit(f"--resume: {ckpt_dir} was written by an older train.py (no log in state.pt); start a new out_dir")
    if lora_rank > 0:
        sample.load_lora(m, os.path.join(ckpt_dir, 'lora.safetensors'))
    else:
        from safetensors.torch import load_file
        m.transformer.load_state_dict(load_file(os.path.join(ckpt_dir, 'transformer.safetensors')))
    for p in params:
        p.data = p.data.float()
    optimizer.load_state_dict(state['optimizer'])
    for g in optimizer.param_groups:                          # --lr / --weight_decay given now win over the checkpoint
        g['lr'], g['weight_decay'] = lr, weight_decay
    for e, s in zip(ema, state['ema'] or [p.detach() for p in params]):   # EMA newly on: start at the resumed weights
        e.copy_(s)
    rng = state['rng'][rank] if rank < len(state['rng']) else state['rng'][0]
    torch.set_rng_state(rng['cpu'])
    if torch.cuda.is_available() and 'cuda' in rng:
        torch.cuda.set_rng_state(rng['cuda'])
    it0, skipped, base_eval = state['step'], state['skipped'], state['base_eval']
    log_rows = [json.loads(r) for r in state['log']]            # the log as of the checkpoint: no row lost or doubled
if master:
    n_train = sum(p.numel() for p in params)
    where = sorted({'.'.join(x for x in n.split('.lora_')[0].split('.')[-2:] if not x.isdigit() or 'out' in n)
                    for n, p in m.transformer.named_parameters() if p.requires_grad})
    print(json.dumps(config, indent=1))
    print(f"{m.family} policy, {world} rank(s), {n_train:,} trainable parameters in {len(where)} module kinds: {where}")
    reward.write_json(config, os.path.join(out_dir, 'config.json'))
    with open(log_path, 'w') as f:                            # rewritten so a resumed log has no duplicates
        f.writelines(json.dumps(r) + '\n' for r in log_rows)
    if wandb_log:
        import wandb
        wandb.init(project='promptecho', config=config)


def evaluate(step):
    """Held-out prompts, fixed seeds: the metric (e.g. the toy detector) and the PromptEcho reward. Master only."""
    out = {}
    if not eval_rows or not master:
        return out
    m.transformer.eval()
    sample.move(text_encoders, device); sample.move(m.vae, device)
    with autocast:
        imgs, _ = sample.generate(m, [r['prompt'] for r in eval_rows], [rank_seed(seed, 0, i, 7) for i in range(len(eval_rows))],
                                  rollout_steps, rollout_cfg, resolution, resolution, negative_prompt, rollout_batch)
    sample.move(text_encoders, device if text_encoder_on_gpu else 'cpu'); sample.move(m.vae, device if vae_on_gpu else 'cpu')
    if metric is not None:
        out['eval_metric'] = float(np.mean([metric(a, r['prompt']) for a, r in zip(sample.to_uint8(imgs), eval_rows)]))
    if vlm_model is not None:
        sample.move(vlm_model, device)
        out['eval_reward'] = reward.promptecho_reward(vlm_model, processor, imgs, [r.get('label', r['prompt']) for r in eval_rows],
                                                      [r.get('query', reward.QUERY) for r in eval_rows], max_batch=reward_batch,
                                                      max_pixels=vlm_max_pixels).mean().item()
        sample.move(vlm_model, device if vlm_on_gpu else 'cpu')
    sample.save_png(sample.grid(imgs[:16], 8), os.path.join(out_dir, f'eval_{step:05d}.png'))
    print(f"eval @ iter {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out


# -----------------------------------------------------------------------------
# the RL loop
n_local = N // world
local = list(range(rank * n_local, (rank + 1) * n_local))    # global rollout indices j = g*K + k on this rank
steps_per_epoch = N // batch_size
accum = batch_size // (world * micro_batch)                   # micro-steps per optimizer step per rank
T = train_timesteps
if it0 == 0:
    base_eval = evaluate(0)                                   # held-out before RL (a resume reads it from the checkpoint)
for it in range(it0, max_iters):
    times = {}
    # ---------------- ROLLOUT: K images per prompt, deterministic Euler ODE, no grad
    sync(); t = time.time()
    m.transformer.eval()
    picks = np.random.default_rng([seed, it]).choice(len(train_rows), G, replace=False)  # G unique prompts
    rows = [train_rows[picks[j // K]] for j in local]
    groups = sorted({j // K for j in local})                  # the prompt groups this rank draws
    sample.move(text_encoders, device)
    cond_g = sample.encode(m, [train_rows[picks[g]]['prompt'] for g in groups])
    sample.move(text_encoders, device if text_encoder_on_gpu else 'cpu')
    cond = sample.take(cond_g, [groups.index(j // K) for j in local])       # per rollout, reused by the update
    if 'guidance' in cond:                                    # FLUX.1-dev: train at the rollouts' guidance input
        cond['guidance'] = torch.full_like(cond['guidance'], rollout_cfg)
    noise = sample.initial_noise(m, [rank_seed(seed, it, j) for j in local], resolution, resolution)
    x0, images = [], []
    sample.move(m.vae, device)
    for i in range(0, n_local, rollout_batch):
        idx = list(range(i, min(i + rollout_batch, n_local)))
        with autocast:
            x = sample.euler_sample(m, sample.take(cond, idx), noise[idx], sigmas, rollout_cfg,
                                    sample.take(neg_cond, [0] * len(idx)))
            images.append(sample.decode(m, x))
        x0.append(x)
    sample.move(m.vae, device if vae_on_gpu else 'cpu')
    x0, images = torch.cat(x0), torch.cat(images)            # [n_local, C, h, w], [n_local, 3, H, W]
    sync(); times['t_rollout'] = time.time() - t

    # ---------------- REWARD: the frozen VLM echoes each prompt
    t = time.time()
    if reward_fn == 'promptecho':
        sample.move(vlm_model, device)
        r_local = reward.promptecho_reward(vlm_model, processor, images, [r.get('label', r['prompt']) for r in rows],
                                           [r.get('query', reward.QUERY) for r in rows], max_batch=reward_batch,
                                           max_pixels=vlm_max_pixels)
        sample.move(vlm_model, device if vlm_on_gpu else 'cpu')
    elif reward_fn == 'inferscore':                           # ablation: a sampled 0-10 rating, NaN if unparsable
        sample.move(vlm_model, device)
        r_local, _ = reward.infer_score(vlm_model, processor, images, [r['prompt'] for r in rows], max_batch=reward_batch,
                                        max_pixels=vlm_max_pixels, generator_seed=rank_seed(seed, it, rank, 5))
        sample.move(vlm_model, device if vlm_on_gpu else 'cpu')
    elif reward_fn == 'random':                               # control: a reward that carries no information
        r_local = torch.tensor([rank_seed(seed, it, j, 1) % 10 ** 6 / 1e6 for j in local])
    else:
        r_local = torch.as_tensor(reward_plugin(images, rows), dtype=torch.float32)
        if r_local.shape != (n_local,):
            sys.exit(f"reward_fn={reward_fn!r} returned shape {tuple(r_local.shape)} for {n_local} images; "
                     f"it must return one reward per image")
    r_all = gather(r_local.float().to(device), world).cpu()  # [N] every rank sees every group's rewards
    if reward_fn == 'inferscore':                             # an unparsable rating gets its group's mean: advantage 0
        unparsed = r_all.isnan().float().mean().item()
        r_all = awm.fill_missing(r_all.view(G, K)).flatten()
    sync(); times['t_reward'] = time.time() - t

    # ---------------- ADVANTAGES within each prompt group
    finite = bool(torch.isfinite(r_all).all())
    adv_all = (awm.group_advantages(r_all.view(G, K), adv_std_norm, adv_clip, adv_positive_only) if finite
               else torch.zeros(G, K))
    adv = adv_all.flatten()[local].to(device)                # [n_local]

    # ---------------- UPDATE: advantage-weighted flow matching on the policy's own x0
    t = time.time()
    stats, gnorms = [], []
    if not finite:
        skipped += 1
        if master:
            print(f"iter {it}: non-finite reward, update skipped on every rank")
    m.transformer.train()
    with torch.no_grad():
        for o, p in zip(old, params):                        # pi_old of the ratio: the weights that drew the rollouts
            o.copy_(p)
    stepped = False                                          # an optimizer step taken: the rollouts are off-policy
    for epoch in range(epochs_per_iter if finite else 0):
        # each block of steps_per_epoch consecutive rollouts spreads over the epoch's steps: every rank
        # feeds every step the same number of its rollouts, whatever the world size
        g = torch.Generator().manual_seed(rank_seed(seed, it, epoch, 4))
        step_of = torch.rand(N // steps_per_epoch, steps_per_epoch, generator=g).argsort(1).flatten()[local]
        for s in range(steps_per_epoch):
            mine = (step_of == s).nonzero()[:, 0]            # local rollouts of this optimizer step
            for mb in mine.split(micro_batch):
                js = [local[i] for i in mb.tolist()]
                ns = [j // K if group_noise else j for j in js]                 # whose noise: the group's or its own
                gens = [torch.Generator(device).manual_seed(rank_seed(seed, it, epoch, n, 2)) for n in ns]
                sig = torch.stack([awm.sample_train_sigmas(sigmas, 1, T, timestep_frac, stratified,
                                   torch.Generator().manual_seed(rank_seed(seed, it, epoch, n, 3)))[0] for n in ns])
                eps = torch.stack([torch.randn(T, C, h, w, generator=gg, device=device) for gg in gens])
                sig, eps = sig.flatten().to(device), eps.flatten(0, 1)          # [mb*T], [mb*T, C, h, w]
                x0r = x0[mb].repeat_interleave(T, 0)                            # [mb*T, C, h, w]
                x_sig = awm.add_noise(x0r, eps, sig)                            # x_sigma = (1-sigma) x0 + sigma eps
                v_tgt = awm.velocity_target(x0r, eps)                           # eps - x0
                cb = sample.take(cond, mb.repeat_interleave(T))
                both = sample.cat([cb, sample.take(neg_cond, [0] * len(sig))]) if train_cfg else None  # None: v_cond
                # the trained field: v_cond, or with train_cfg the guided v the rollouts used
                field = lambda: sample.guided_velocity(m, x_sig.to(ptdtype), sig, cb, both, rollout_cfg)
                v_ref = v_ema = v_old = None
                with autocast:
                    v = field()
                    with torch.no_grad():
                        if beta > 0:                                            # reference = LoRA switched off
                            m.transformer.disable_adapters()
                            v_ref = field()
                            m.transformer.enable_adapters()
                        if ema_beta > 0:                                        # EMA weights swapped in and out
                            v_ema = swapped(params, ema, field)
                        if old and stepped:                                     # pi_old of the ratio: the rollout policy
                            v_old = swapped(params, old, field)
                loss, terms = awm.awm_loss(v, v_tgt, adv[mb].repeat_interleave(T), v_ref, v_ema, beta, ema_beta, clip_range,
                                           sig if ghuber_weighting else None, v_old)
                (loss / accum).backward()
                stats.append({k: x.item() for k, x in terms.items()} | {'loss': loss.item()})
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            all_reduce_mean_(grads, world)
            for p, gr in zip(params, grads):
                p.grad = gr
            gn = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
            if torch.isfinite(gn):                                              # same on every rank (grads reduced)
                optimizer.step()
                stepped = True
                gnorms.append(gn.item())
            else:
                skipped += 1
                if master:
                    print(f"iter {it}: non-finite gradient, optimizer step skipped on every rank")
            optimizer.zero_grad(set_to_none=True)
    if ema and stepped:                                       # once per iteration, as the official code: within an
        awm.ema_update(ema, params, ema_decay)                # iteration the EMA stays as the last one left it
    sync(); times['t_update'] = time.time() - t

    # ---------------- LOG
    row = {'iter': it, 'reward_mean': r_all.mean().item(), 'reward_std': r_all.std().item(),
           'reward_min': r_all.min().item(), 'reward_max': r_all.max().item(),
           'group_std': r_all.view(G, K).std(1, correction=0).mean().item(),   # the std the advantages divide by
           'adv_abs_mean': adv_all.abs().mean().item(), 'adv_max': adv_all.max().item(),
           'grad_norm': float(np.mean(gnorms)) if gnorms else float('nan'), 'lr': lr, 'skipped': skipped}
    if reward_fn == 'inferscore':
        row['unparsed'] = unparsed                            # fraction of ratings InferScore could not read
    for k in (stats[0] if stats else {}):
        v = torch.tensor([st[k] for st in stats]).mean().to(device)
        all_reduce_mean_([v], world)
        row[k] = v.item()
    t = time.time()
    if (eval_every and (it + 1) % eval_every == 0) or it + 1 == max_iters:
        row |= evaluate(it + 1)
    if it == 0 and base_eval:                                # the eval before any update (plotted at 0)
        row |= {k + '_base': v for k, v in base_eval.items()}
    if master and sample_every and (it + 1) % sample_every == 0:
        fixed = (eval_rows or train_rows)[:4]
        sample.move(text_encoders, device); sample.move(m.vae, device)
        with autocast:
            imgs, _ = sample.generate(m, [r['prompt'] for r in fixed for _ in range(2)], list(range(8)), rollout_steps,
                                      rollout_cfg, resolution, resolution, negative_prompt, rollout_batch)
        sample.move(text_encoders, device if text_encoder_on_gpu else 'cpu'); sample.move(m.vae, device if vae_on_gpu else 'cpu')
        os.makedirs(os.path.join(out_dir, 'samples'), exist_ok=True)
        sample.save_png(sample.grid(imgs, 4), os.path.join(out_dir, 'samples', f'iter_{it + 1:05d}.png'))
    times['t_eval'] = time.time() - t                         # the eval and the sample grid
    row |= times
    row['img_per_s'] = N / max(sum(times.values()), 1e-9)     # the whole iteration but its checkpoint write

    # ---------------- CHECKPOINT (atomic; LoRA as diffusers safetensors + optimizer + every rank's RNG)
    t = time.time()
    if (it + 1) % save_every == 0 or it + 1 == max_iters:
        rng = {'cpu': torch.get_rng_state()} | ({'cuda': torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
        rngs = [None] * world
        dist.all_gather_object(rngs, rng) if ddp else rngs.__setitem__(0, rng)
        if master:
            tmp = ckpt_dir + '.tmp'
            shutil.rmtree(tmp, ignore_errors=True)                             # no file of an older, killed save
            os.makedirs(tmp)
            if lora_rank > 0:
                sample.save_lora(m, os.path.join(tmp, 'lora.safetensors'))
            else:
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in m.transformer.state_dict().items()},
                          os.path.join(tmp, 'transformer.safetensors'))
            torch.save({'step': it + 1, 'optimizer': optimizer.state_dict(), 'ema': ema, 'rng': rngs, 'skipped': skipped,
                        'base_eval': base_eval, 'log': [json.dumps(r) for r in log_rows + [row]]},
                       os.path.join(tmp, 'state.pt.part'))
            os.replace(os.path.join(tmp, 'state.pt.part'), os.path.join(tmp, 'state.pt'))   # last: tmp is complete
            shutil.rmtree(ckpt_dir + '.old', ignore_errors=True)                 # a leftover from a killed rmtree
            if os.path.isdir(ckpt_dir):
                os.replace(ckpt_dir, ckpt_dir + '.old')
            os.replace(tmp, ckpt_dir)                                           # the only moment the ckpt changes
            shutil.rmtree(ckpt_dir + '.old', ignore_errors=True)
    row['t_ckpt'] = time.time() - t                           # (not in the checkpoint's copy of this row)
    log_rows.append(row)
    if master:
        with open(log_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        print(f"iter {it}: reward {row['reward_mean']:.4f} (std {row['reward_std']:.4f}) loss {row.get('loss', float('nan')):.5f} "
              f"|g| {row['grad_norm']:.3f} | rollout {times['t_rollout']:.1f}s reward {times['t_reward']:.1f}s "
              f"update {times['t_update']:.1f}s | {row['img_per_s']:.2f} img/s")
        plot_curves(log_rows, ['reward_mean'] + (['eval_metric'] if metric else []), os.path.join(out_dir, 'curves.png'))
        if wandb_log:
            wandb.log(row, step=it)

if master and base_eval:                                      # held-out before / after, in one file
    last = {k: v for k, v in log_rows[-1].items() if k in base_eval} if log_rows else {}
    reward.write_json({'base': base_eval, 'trained': last, 'iters': max_iters}, os.path.join(out_dir, 'eval_summary.json'))
    print("held-out before -> after: " + ", ".join(f"{k} {base_eval[k]:.4f} -> {last.get(k, float('nan')):.4f}"
                                                     for k in base_eval))
if ddp:                                                       # leave together: a rank that tears down gloo while
    dist.barrier()                                            # rank 0 still writes its checkpoint can abort at exit
    dist.destroy_process_group()
