"""Fast tests: python -m pytest -q  (CPU, tiny random models built in conftest.py)."""
import math

import numpy as np
import pytest
import torch

import awm


# -----------------------------------------------------------------------------
# awm.py

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
    u = awm.sample_train_sigmas(sig, n=2000, k=1, frac=1.0, stratified=False, generator=g)
    assert u.min() < 0.1 and u.max() > 0.9 and (u < 1).all() and (u > 0).all()


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


def test_ema_update():
    e, p = [torch.zeros(3)], [torch.ones(3)]
    awm.ema_update(e, p, decay=0.9)
    assert torch.allclose(e[0], torch.full((3,), 0.1))
