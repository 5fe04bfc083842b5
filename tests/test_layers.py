"""SpatialSelfAttention and BottleneckHead against the paper's formulas."""
import pytest
import timm.layers.config
import torch

import ssa_timm
from ssa_timm import AGGREGATIONS, VARIANTS, BottleneckHead, SpatialSelfAttention, SSAHeads


def reference_ssa(layer: SpatialSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Paper section 3.2 written out with matmul + softmax: S[j, i] = softmax_i(A_i . B_j)."""
    b, k, h, w = x.shape
    a = layer.conv_a(x).flatten(2)  # (B, d, N)
    bq = layer.conv_b(x).flatten(2)
    c = layer.conv_c(x).flatten(2)  # (B, K, N)
    if layer.qk_norm:  # cosine similarity times the learnable temperature
        a, bq = a / a.norm(dim=1, keepdim=True), bq / bq.norm(dim=1, keepdim=True) * layer.logit_scale.exp()
    logits = torch.einsum('bdj,bdi->bji', bq, a) * layer.scale
    s = logits.softmax(dim=-1)
    o = torch.einsum('bji,bki->bkj', s, c).reshape(b, k, h, w)
    alpha = layer.alpha if layer.alpha is not None else 1.0
    return {
        'plus': alpha * o + x,
        'multiply': alpha * o * x,
        'alpha': alpha * o,
        'no_alpha': o,
    }[layer.aggregation]


def assert_matches_reference(layer: SpatialSelfAttention, x: torch.Tensor, tol: float = 1e-5,
                             grad_atol: float = 1e-5, grad_rtol: float = 1e-4) -> torch.Tensor:
    """Check ``layer(x)`` and the gradients of a loss on it against ``reference_ssa``; return the reference."""
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    ref = reference_ssa(layer, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=grad_atol, rtol=grad_rtol)
    return ref


@pytest.mark.parametrize('aggregation', AGGREGATIONS)
@pytest.mark.parametrize('batch,k,hw,scale,qk_norm', [
    (1, 8, (3, 5), False, False), (2, 16, (7, 7), False, False), (3, 32, (14, 14), True, False),
    (2, 16, (7, 7), False, True),
])
def test_sdpa_matches_reference(aggregation, batch, k, hw, scale, qk_norm):
    torch.manual_seed(0)
    layer = SpatialSelfAttention(k, aggregation=aggregation, scale_attn=scale, qk_norm=qk_norm, fused_attn=True)
    if layer.alpha is not None:
        layer.alpha.data.fill_(0.7)  # alpha starts at 0, which would hide O
    x = torch.randn(batch, k, *hw, requires_grad=True)
    ref = assert_matches_reference(layer, x)
    plain, _ = layer.forward_with_attention(x)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)


def _runs_sdpa(layer: SpatialSelfAttention) -> bool:
    with torch.profiler.profile() as prof:
        layer(torch.randn(1, layer.in_channels, 3, 3))
    return any(e.key == 'aten::scaled_dot_product_attention' for e in prof.key_averages())


def test_fused_attention_serves_eval_and_plain_path_serves_training(monkeypatch):
    layer = SpatialSelfAttention(8)
    assert not _runs_sdpa(layer.train()) and _runs_sdpa(layer.eval())
    assert _runs_sdpa(SpatialSelfAttention(8, fused_attn=True).train())
    assert not _runs_sdpa(SpatialSelfAttention(8, fused_attn=False).eval())
    monkeypatch.setattr(timm.layers.config, '_USE_FUSED_ATTN', 0)  # what TIMM_FUSED_ATTN=0 does
    assert not _runs_sdpa(SpatialSelfAttention(8).eval())
    torch.manual_seed(0)
    layer.alpha.data.fill_(0.5)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(layer.train()(x), reference_ssa(layer, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.eval()(x), reference_ssa(layer, x), atol=1e-5, rtol=1e-5)


def test_attention_map_is_row_stochastic_and_matches_output():
    torch.manual_seed(0)
    layer = SpatialSelfAttention(16, aggregation='no_alpha')
    x = torch.randn(2, 16, 4, 6)
    out, attn = layer.forward_with_attention(x)
    assert attn.shape == (2, 24, 24)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 24))
    values = layer.conv_c(x).flatten(2)  # (B, K, N)
    torch.testing.assert_close(out.flatten(2), values @ attn.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_alpha_starts_at_zero_so_plus_is_identity():
    layer = SpatialSelfAttention(8, aggregation='plus')
    x = torch.randn(2, 8, 5, 5)
    assert layer.alpha.item() == 0.0
    torch.testing.assert_close(layer(x), x)
    assert SpatialSelfAttention(8, aggregation='no_alpha').alpha is None


def test_qk_ratio_and_scale():
    layer = SpatialSelfAttention(64, qk_ratio=0.125, scale_attn=True)
    assert layer.conv_a.out_channels == layer.conv_b.out_channels == 8
    assert layer.conv_c.out_channels == 64
    assert layer.scale == pytest.approx(8 ** -0.5)
    assert SpatialSelfAttention(64).scale == 1.0  # the paper's unscaled logits


@pytest.mark.parametrize('kwargs,match', [
    (dict(in_channels=8, aggregation='sum'), r"must be one of \(.*'no_alpha', 'no_attention'\), got 'sum'"),
    (dict(in_channels=8, aggregation='no_attention'), "'no_attention' means no SpatialSelfAttention"),
    (dict(in_channels=8, qk_ratio=0.0), 'qk_ratio'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpatialSelfAttention(**kwargs)


@pytest.mark.parametrize('shape', [(2, 4, 5, 5), (2, 8, 25)])
def test_bad_input_shape_names_expected(shape):
    with pytest.raises(Exception, match=r'expected a \(B, 8, H, W\) feature map'):
        SpatialSelfAttention(8)(torch.randn(shape))


def test_head_layers_and_outputs():
    head = BottleneckHead(16, num_classes=5, width=32).eval()
    x = torch.randn(3, 16, 4, 4)
    assert isinstance(head.norm, torch.nn.BatchNorm1d) and head.fc_hidden.out_features == 32
    hidden = head(x, pre_logits=True)
    expected_hidden = head.norm(head.fc_hidden(x.mean((2, 3))))
    torch.testing.assert_close(hidden, expected_hidden)
    torch.testing.assert_close(head(x), head.fc(hidden))


def test_head_reset_keeps_hidden_layers_and_pool():
    head = BottleneckHead(16, num_classes=5, width=32, pool_type='max').requires_grad_(False).eval()
    hidden = head.fc_hidden
    head.reset(0)
    assert head.fc is None and head.fc_hidden is hidden
    assert head.global_pool.pool_type == 'max'
    assert not any(p.requires_grad for p in head.parameters())
    head.reset(0, '')
    x = torch.randn(2, 16, 3, 3)
    assert head(x) is x  # unpooled pass-through
    head.reset(7, '')
    with pytest.raises(RuntimeError, match='unpooled head'):
        head(x)
    head.reset(7, 'avg')
    assert head(x).shape == (2, 7) and not head.fc.training


def test_head_rejects_pool_that_changes_channels():
    with pytest.raises(ValueError, match='changes the channel count'):
        BottleneckHead(16, 5, pool_type='catavgmax')


def test_qk_norm_bounds_the_logits_by_its_temperature():
    torch.manual_seed(0)
    layer = SpatialSelfAttention(16, aggregation='no_alpha', qk_norm=True)
    with pytest.raises(ValueError, match='qk_norm and scale_attn exclude each other'):
        SpatialSelfAttention(16, qk_norm=True, scale_attn=True)
    x = torch.randn(2, 16, 5, 5) * 1000  # huge activations: plain dot products would saturate
    layer.conv_a.weight.data.mul_(100)
    _, attn = layer.forward_with_attention(x)
    # |logits| <= 10 (the initial temperature), so no row can be more peaked than e^20 : 1 over 25
    assert attn.max() <= torch.tensor(20.).exp() / (torch.tensor(20.).exp() + 24) + 1e-6
    assert attn.min() > 0
    layer.logit_scale.data.fill_(10.)  # clamped at a temperature of 100
    q, _ = layer._queries_keys(x)
    torch.testing.assert_close(q.norm(dim=1), torch.full((2, 25), 100.))


def test_one_name_for_the_map_channels():
    """``in_channels`` is the map's K in the SSA layer, the head and the SSA head module alike."""
    attn, head = SpatialSelfAttention(in_channels=12), BottleneckHead(in_channels=12, num_classes=3)
    heads = SSAHeads(in_channels=12, num_classes=3)
    assert attn.in_channels == head.in_channels == heads.in_channels == heads.attn.in_channels == 12
    assert VARIANTS == AGGREGATIONS + ('no_attention',)


def test_alpha_init_sets_where_alpha_starts_and_lets_the_attention_learn_at_once():
    torch.manual_seed(0)
    f = torch.randn(2, 8, 4, 4)
    for alpha_init, learns in ((0., False), (1., True)):
        layer = SpatialSelfAttention(8, 'plus', alpha_init=alpha_init)
        assert float(layer.alpha) == alpha_init
        layer(f).square().sum().backward()
        assert (layer.conv_a.weight.grad.abs().sum() > 0) == learns  # at 0 alpha, O gets no gradient through it
    model = ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=3, img_size=32, alpha_init=0.5)
    assert float(model.head.attn.alpha) == 0.5


def test_an_export_keeps_alpha_in_its_weights_not_its_model_args(tmp_path, capsys):
    import json
    from recipe_runs import TINY_TRAIN, run_main
    from ssa_timm.hub import export_model, load_model
    model = ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=3, img_size=32, alpha_init=0.5)
    folder = export_model(model, str(tmp_path / 'best'), ['a', 'b', 'c'])
    assert 'alpha_init' not in json.loads((folder / 'config.json').read_text())['model_args']  # 0.6 refuses it
    assert float(load_model(str(folder)).head.attn.alpha) == 0.5
    no_alpha = [a if a != 'ssanet_test_resnet_plus' else 'ssanet_test_resnet_no_alpha' for a in TINY_TRAIN]
    assert run_main('train', *no_alpha, '--alpha-init', '1', '--output-dir', str(tmp_path / 'run')) == 2
    assert 'ssanet_test_resnet_no_alpha has no alpha' in capsys.readouterr().err
    assert run_main('train', *TINY_TRAIN, '--alpha-init', 'nan', '--output-dir', str(tmp_path / 'nan')) == 2
    assert "--alpha-init: expected a finite number, got 'nan'" in capsys.readouterr().err
