"""The attention remedies as model arguments (issue 26): SAGAN's safeguard ``sagan_qk`` (spectral norm on
the query/key convs, K/8 channels) beside ``scale_attn`` and ``qk_norm``; ablation.py's table with the
localisation columns."""
import pytest
import torch

import ssa_timm
from ssa_timm.hub import attention_args
from ssa_timm.layers import SpatialSelfAttention, SpectralNormConv2d
from ssa_timm.train.config import RunConfig


def test_sagan_qk_narrows_and_spectrally_normalises_queries_and_keys():
    torch.manual_seed(0)
    layer = SpatialSelfAttention(64, sagan_qk=True, fused_attn=False)
    assert isinstance(layer.conv_a, SpectralNormConv2d) and isinstance(layer.conv_b, SpectralNormConv2d)
    assert layer.conv_a.out_channels == layer.conv_b.out_channels == 8 and layer.conv_c.out_channels == 64
    with torch.no_grad():
        layer.conv_a.weight.mul_(50)  # a large weight: its spectral norm, not its size, sets the logits
    x = torch.randn(2, 64, 5, 5)
    layer.train()
    for _ in range(100):  # power iterations, one per training forward
        layer(x)
    sigma = torch.linalg.matrix_norm(layer.conv_a.normalized_weight().flatten(1), 2)
    assert sigma.item() == pytest.approx(1.0, abs=1e-2)
    layer.eval()
    fused = SpatialSelfAttention(64, sagan_qk=True, fused_attn=True).eval()
    fused.load_state_dict(layer.state_dict())
    with torch.no_grad():
        layer.alpha.fill_(0.7)
        fused.alpha.fill_(0.7)
        torch.testing.assert_close(fused(x), layer(x), atol=1e-5, rtol=1e-5)
        before = layer.conv_a.sn_u.clone()
        layer(x)
        assert torch.equal(before, layer.conv_a.sn_u)  # eval mode does not iterate
    scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x), layer(x))


def test_sagan_qk_excludes_what_it_replaces():
    with pytest.raises(ValueError, match='sagan_qk sets the width'):
        SpatialSelfAttention(64, sagan_qk=True, qk_norm=True)
    with pytest.raises(ValueError, match='sagan_qk sets the width'):
        SpatialSelfAttention(64, sagan_qk=True, qk_ratio=0.5)


def test_sagan_qk_is_a_model_argument_recorded_in_exports():
    model = ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=3, img_size=32, body_feature_index=2,
                                   sagan_qk=True)
    assert model.head.attn.sagan_qk and 'head.attn.conv_a.sn_u' in model.state_dict()
    assert attention_args(model) == {'qk_norm': False, 'scale_attn': False, 'sagan_qk': True}
    config = RunConfig.from_mapping({'sagan_qk': True, 'model': 'ssanet_resnet18_plus'})
    assert config.model_kwargs()['sagan_qk'] is True
    for default in (ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=3, img_size=32, body_feature_index=2),
                    ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=3, img_size=32, body_feature_index=2,
                                           qk_norm=False)):  # cosine attention (the default) and the paper's
        assert not default.head.attn.sagan_qk and 'sagan_qk' not in attention_args(default)


def test_ablation_tables_carry_every_seed_and_the_localisation_columns():
    from ssa_timm.grid import grid_configs
    from ssa_timm.grid_report import tables
    assert ('plus', 'ad', 'sagan-qk') in grid_configs(['plus'], ['ad'], ['sagan-qk', 'qk-norm'])

    def row(variant, remedy, seed, top1, mass):
        attention = None if variant == 'no_attention' else dict(alpha=-0.1, entropy_ratio=0.5, row_max=0.3)
        where = dict(images=10, box_share=0.1, pointing_cam=0.9, in_box_mass=mass,
                     pointing_attention=None if mass is None else 0.8)
        return dict(variant=variant, loss='ad', remedy=remedy, seed=seed, top1=top1, heads={'fe': top1},
                    attention=attention, localization=where)
    rows = [row('no_attention', '', s, 60 + s, None) for s in (0, 1)]
    rows += [dict(row('plus', r, s, 70 + 2 * s, 0.5), heads={'ssa': 71.0, 'fe': 69.0}) for r in ('', 'sagan-qk')
             for s in (0, 1)]
    text = tables(rows, [0, 1], 'builtin scene, scratch')
    assert '| no_attention | 60.5 ± 0.7 | 60.0 / 61.0 | - | 60.5 | 75.0 | - | - | - | - (0.10) | 0.90 | - |' in text
    sagan = ('| plus --sagan-qk | ad | 71.0 ± 1.4 | 70.0 / 72.0 | 71.0 | 69.0 | 0.100 | 0.50 | 0.30 | 0.50 (0.10) | '
             '0.90 | 0.80 |')
    assert sagan in text
    assert 'in-box attention (uniform) | pointing: Grad-CAM | pointing: attention' in text
