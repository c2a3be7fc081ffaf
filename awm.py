"""
AWM: Advantage Weighted Matching (arXiv 2509.25050), as pure tensor math.

Nothing here loads a model: train.py calls these functions with the policy's
velocity predictions and the rollouts' rewards. Conventions, for every family:
    x_sigma = (1 - sigma) * x0 + sigma * eps      sigma = 1 is pure noise
    v       = dx/dsigma = eps - x0                the velocity every adapter in sample.py returns
The Euler sampler walks sigma from 1 to 0 with x <- x + (sigma_next - sigma) * v.
"""
import torch


# -----------------------------------------------------------------------------
# group-relative advantages

def group_advantages(rewards, std_norm=True, clip=0.0, positive_only=False, eps=1e-4):
    """rewards [G, K]: G prompts x K images each -> advantages [G, K].

    PromptEcho paper: A = (r - mean_group(r)) / (std_group(r) + eps).
    Official AWM code: (r - group mean) / (std + 1e-4), std taken over the whole batch
    or per prompt (a flag), then clamped to +-5. The PromptEcho inference README writes
    A = r - group mean (std_norm=False). Flow-Factory clips to +-1.
    positive_only=True keeps only the better-than-mean images (A <- max(A, 0)): the update then
    regresses onto the group's good samples (reward-ranked fine-tuning, as in RAFT / ReST) and
    never pushes the model away from its bad ones. Not in the paper: an ablation.
    """
    mean = rewards.mean(dim=1, keepdim=True)                  # [G, 1]
    adv = rewards - mean                                      # centred within each group
    if std_norm:
        std = rewards.std(dim=1, keepdim=True, unbiased=False)  # [G, 1], numpy-style (ddof=0) like the official tracker
        adv = adv / (std + eps)                               # A = (r - mean) / (std + eps)
    if clip > 0:
        adv = adv.clamp(-clip, clip)                          # A <- clip(A, -c, c)
    if positive_only:
        adv = adv.clamp(min=0)                                # A <- max(A, 0)
    return adv


def fill_missing(rewards):
    """rewards [G, K] with NaN where a reward is missing (InferScore could not parse the VLM's answer) ->
    each NaN replaced by the mean of its group's other rewards, so its advantage is 0 (neither pushed nor
    pulled); a group with no reward at all gets 0s. The group's std then counts the filled entries."""
    mean = rewards.nanmean(dim=1, keepdim=True).nan_to_num(0.0)  # [G, 1] mean of the present rewards
    return torch.where(rewards.isnan(), mean, rewards)


# -----------------------------------------------------------------------------
# timesteps, noising and the flow-matching target

def sample_train_sigmas(sigmas, n, k, frac=1.0, stratified=True, generator=None):
    """Pick k training noise levels for each of n samples from the sampler's own grid.

    sigmas: the rollout's schedule [S+1], descending from 1 to 0 (the final 0 is never picked).
    Like the official code ('discrete_wo_init'), index 0 (sigma = 1, pure noise) is skipped
    and only the first `frac` of the steps (the noisier part) are used. stratified=True
    splits that index range into k equal strata and draws one index in each (low variance);
    False draws k indices uniformly. Returns [n, k] sigma values. (The official code floors
    steps * frac, where we round it, and makes the strata edges integers before drawing.)
    """
    steps = sigmas.numel() - 1
    if steps < 2 or not 0 < frac <= 1:
        raise ValueError(f"training sigmas need a grid of >= 2 steps and 0 < frac <= 1 (got {steps} steps, frac {frac})")
    hi = max(2, int(round(steps * frac)))                     # usable indices are 1 .. hi-1
    u = torch.rand(n, k, generator=generator)                 # [n, k] in [0, 1)
    if stratified:
        edges = torch.linspace(1, hi, k + 1)                  # k strata over [1, hi)
        lo, width = edges[:-1], edges[1:] - edges[:-1]
        idx = (lo + u * width).long().clamp(1, hi - 1)        # one draw per stratum
    else:
        idx = 1 + (u * (hi - 1)).long()                       # uniform over [1, hi)
    return sigmas.float()[idx]                                # [n, k]


def add_noise(x0, eps, sigma):
    """Rectified-flow interpolation x_sigma = (1 - sigma) x0 + sigma eps. sigma [N] -> broadcast."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def velocity_target(x0, eps):
    """Flow-matching target v* = d x_sigma / d sigma = eps - x0."""
    return eps - x0


def per_sample_mse(a, b):
    """||a - b||^2 averaged over all but the batch dim: [N, ...] -> [N] (float32)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def ghuber(mse, sigma, p=0.25, eps=1e-10):
    """The official AWM code's robust re-weighting of the per-sample MSE [N] at noise levels sigma [N]:
    ((mse + eps)^p - eps^p) * sigma / p. Its gradient is sigma * mse^(p-1) * grad mse: a sample with a
    large error counts less, a noisier level more; p = 1 gives sigma * mse."""
    return ((mse + eps) ** p - eps ** p) * sigma.float() / p


# -----------------------------------------------------------------------------
# the AWM objective

def awm_loss(v, v_target, adv, v_ref=None, v_ema=None, beta=0.0, ema_beta=0.0, clip_range=0.0, sigma=None, v_old=None):
    """The AWM loss on the policy's own clean samples.

    v         [N, ...] policy velocity at x_sigma (with grad)
    v_target  [N, ...] eps - x0
    adv       [N]      advantage of the rollout each row came from
    v_ref     [N, ...] velocity with the LoRA disabled (no grad), used when beta > 0
    v_ema     [N, ...] velocity of the EMA LoRA (no grad), used when ema_beta > 0
    clip_range: 0 -> the plain form; > 0 -> the official ratio/clip form (PPO-style).
    sigma     [N]      noise levels: given -> the matching loss is ghuber(mse, sigma) (official code),
                       None -> the plain MSE (the paper's equation)
    v_old     [N, ...] velocity of the rollout policy at the same x_sigma (no grad), for the ratio when
                       clip_range > 0; None -> on-policy (no optimizer step yet): pi_old = pi_theta
    Returns (loss, dict of detached terms for logging).
    """
    mse = per_sample_mse(v, v_target)                         # [N] ||v_theta(x_sigma) - (eps - x0)||^2
    match = mse if sigma is None else ghuber(mse, sigma)     # [N] the -log pi surrogate
    if clip_range > 0:
        logp = -match                                         # log pi surrogate: minus the flow-matching loss
        if v_old is None:
            logp_old = logp.detach()                          # on-policy: ratio = 1, gradient = grad logp
        else:
            mse_old = per_sample_mse(v_old, v_target)
            logp_old = -(mse_old if sigma is None else ghuber(mse_old, sigma))
        ratio = torch.exp(logp - logp_old)                    # pi_theta / pi_old, one per row
        clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
        policy = torch.maximum(-adv * ratio, -adv * clipped).mean()  # PPO clipped surrogate
    else:
        policy = (adv * match).mean()                         # AWM: L = E[A * ||v_theta - (eps - x0)||^2]
    loss = policy
    terms = {'policy': policy.detach(), 'mse': mse.mean().detach()}
    if beta > 0:
        kl = per_sample_mse(v, v_ref).mean()                  # KL term: beta * ||v_theta - v_ref||^2
        loss = loss + beta * kl
        terms['kl'] = kl.detach()
    if ema_beta > 0:
        ema = per_sample_mse(v, v_ema).mean()                 # EMA term: ema_beta * ||v_theta - v_ema||^2
        loss = loss + ema_beta * ema
        terms['ema'] = ema.detach()
    return loss, terms


@torch.no_grad()
def ema_update(ema_params, params, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, parameter by parameter."""
    for e, p in zip(ema_params, params):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)
