"""SelfADLoss against Eqs. 3-5 computed by hand."""
import math

import pytest
import torch

from ssa_timm import SelfADLoss

Z_SSA = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
Z_FE = torch.tensor([[1.0, 1.0, 0.0], [-0.5, 0.0, 1.5]])
TARGET = torch.tensor([0, 2])


def _ce(z, y):
    return sum(-math.log(math.exp(z[i][y[i]]) / sum(math.exp(v) for v in z[i])) for i in range(len(y))) / len(y)


def _kl(z_t, z_s, t):
    total = 0.0
    for row_t, row_s in zip(z_t, z_s):
        p = [math.exp(v / t) / sum(math.exp(u / t) for u in row_t) for v in row_t]
        q = [math.exp(v / t) / sum(math.exp(u / t) for u in row_s) for v in row_s]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(z_t)


@pytest.mark.parametrize('gamma,temperature', [(0.5, 1.0), (0.25, 3.0)])
def test_self_ad_matches_hand_computed(gamma, temperature):
    zs, zf, y = Z_SSA.tolist(), Z_FE.tolist(), TARGET.tolist()
    expected = _ce(zs, y) + _kl(zs, zf, temperature) * temperature ** 2 + gamma * _ce(zs, y)
    loss = SelfADLoss(gamma=gamma, temperature=temperature)((Z_SSA, Z_FE), TARGET)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ce_mode_and_single_head():
    zs, zf, y = Z_SSA.tolist(), Z_FE.tolist(), TARGET.tolist()
    assert SelfADLoss(mode='ce')((Z_SSA, Z_FE), TARGET).item() == pytest.approx(_ce(zs, y) + _ce(zf, y), rel=1e-5)
    assert SelfADLoss()(Z_SSA, TARGET).item() == pytest.approx(_ce(zs, y), rel=1e-5)


def test_label_smoothing_changes_every_ce_term():
    eps = 0.1
    smoothed = SelfADLoss(mode='ce', label_smoothing=eps)((Z_SSA, Z_FE), TARGET)
    expected = sum(torch.nn.functional.cross_entropy(z, TARGET, label_smoothing=eps) for z in (Z_SSA, Z_FE))
    torch.testing.assert_close(smoothed, expected)
    assert smoothed.item() != pytest.approx(SelfADLoss(mode='ce')((Z_SSA, Z_FE), TARGET).item())


@pytest.mark.parametrize('detach', [True, False])
def test_teacher_gradient_follows_detach_option(detach):
    z_ssa = Z_SSA.clone().requires_grad_()
    z_fe = Z_FE.clone().requires_grad_()
    loss_fn = SelfADLoss(detach_teacher=detach)
    kl_grad_ssa, kl_grad_fe = torch.autograd.grad(loss_fn.distillation(z_ssa, z_fe), [z_ssa, z_fe], allow_unused=True)
    assert kl_grad_fe is not None and kl_grad_fe.abs().sum() > 0
    if detach:
        assert kl_grad_ssa is None
    else:
        assert kl_grad_ssa.abs().sum() > 0
    # the student gets its gradient only from the KL term
    g_ssa, g_fe = torch.autograd.grad(loss_fn((z_ssa, z_fe), TARGET), [z_ssa, z_fe])
    torch.testing.assert_close(g_fe, kl_grad_fe)


@pytest.mark.parametrize('logits,target,match', [
    ((Z_SSA, Z_FE[:, :2]), TARGET, 'same shape'),
    ((Z_SSA, Z_FE, Z_FE), TARGET, 'one logits tensor or a pair'),
    ((Z_SSA[0], Z_FE[0]), TARGET, r'\(batch, num_classes\)'),
    ((Z_SSA, Z_FE), torch.tensor([0, 3]), r'labels must be in \[0, 3\)'),
    ((Z_SSA, Z_FE), torch.tensor([-1, 0]), r'labels must be in \[0, 3\)'),
    ((Z_SSA, Z_FE), torch.tensor([0, 1, 2]), r'target of shape \(2,\)'),
    ((Z_SSA, Z_FE), torch.tensor([0.0, 1.0]), 'torch.long'),
])
def test_bad_input_raises_clear_error(logits, target, match):
    with pytest.raises(ValueError, match=match):
        SelfADLoss()(logits, target)


def test_bad_options():
    with pytest.raises(ValueError, match="mode must be 'ad' or 'ce'"):
        SelfADLoss(mode='kd')
    with pytest.raises(ValueError, match='temperature'):
        SelfADLoss(temperature=0)
