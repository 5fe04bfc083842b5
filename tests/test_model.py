"""SSANet: registry, the two-head contract, the timm API pieces our users rely on."""
import json

import pytest
import timm
import torch

import ssa_timm
import ssa_timm.hub
from ssa_timm import SSANet, VARIANTS, create_ssanet

BODIES = ('vgg16', 'resnet50', 'inception_v3', 'densenet121', 'densenet161')
NAMES = [f'ssanet_{b}_{v}' for b in BODIES for v in VARIANTS]
CURATED = {
    'resnet18': 'a1_in1k', 'convnext_tiny': 'in12k_ft_in1k', 'efficientnet_b0': 'ra_in1k',
    'vit_small_patch16_384': 'augreg_in21k_ft_in1k', 'eva02_tiny_patch14_336': 'mim_in22k_ft_in1k',
    'swin_tiny_patch4_window7_224': 'ms_in1k',
}
CURATED_NAMES = [f'ssanet_{b}_{v}' for b in CURATED for v in ('plus', 'no_attention')]


def small(body='resnet18', aggregation='plus', **kwargs):
    torch.manual_seed(0)
    return create_ssanet(body, aggregation, **kwargs)


def test_registry_lists_the_paper_and_curated_names():
    assert sorted(timm.list_models('ssanet_*')) == sorted(NAMES + CURATED_NAMES)
    assert 'ssanet' in timm.list_models('ssanet')  # the generic entrypoint of create_ssanet
    curated_tags = [f'ssanet_{b}_{v}.{t}' for b, t in CURATED.items() for v in ('plus', 'no_attention')]
    paper_tags = [f'{n}.tv_in1k' for n in NAMES]
    assert sorted(timm.list_models('ssanet_*', pretrained=True)) == sorted(paper_tags + curated_tags)
    for name in curated_tags:  # every tag names body weights that exist in timm's own Hub repos
        body = name.split('.')[0][len('ssanet_'):].rsplit('_plus', 1)[0].rsplit('_no_attention', 1)[0]
        assert timm.models.get_pretrained_cfg(name).hf_hub_id == f'timm/{body}.{name.split(".")[1]}'
    cfg = timm.models.get_pretrained_cfg('ssanet_vgg16_plus')
    assert cfg.hf_hub_id == 'timm/vgg16.tv_in1k' and cfg.input_size == (3, 448, 448) and cfg.pool_size == (14, 14)
    assert cfg.classifier == ('head.ssa.fc', 'head.fe.fc') and cfg.crop_mode == 'squash' and cfg.crop_pct == 1.0
    assert timm.models.get_pretrained_cfg('ssanet_vgg16_no_attention').classifier == 'head.fe.fc'
    generic = timm.models.get_pretrained_cfg('ssanet')
    assert generic.pool_size == (14, 14) and generic.first_conv == 'body.conv1' and generic.crop_mode == 'squash'


# every paper body once, every aggregation once (timm's suite in CI runs the backward of every *_plus name
# and of every ssanet_vgg16_* aggregation too)
@pytest.mark.parametrize('name', [f'ssanet_{b}_plus' for b in BODIES] + [f'ssanet_resnet50_{v}' for v in VARIANTS[1:]])
def test_registered_names_train_a_step(name):
    model = timm.create_model(name, num_classes=3)
    model.set_distilled_training(True)
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([0, 2])
    logits = model(x)
    assert isinstance(logits, tuple) != name.endswith('no_attention')
    ssa_timm.SelfADLoss()(logits, y).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.eval()(x).shape == (2, 3)


def test_vgg_body_has_no_fc_layers():
    # structure only: the full-size VGG-16 on the meta device (shapes propagate, nothing is allocated)
    model = timm.create_model('ssanet_vgg16_plus', num_classes=200, device='meta')
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.startswith(('body.pre_logits', 'body.head'))]
    body_params = sum(p.numel() for p in model.body.parameters())
    assert body_params == sum(p.numel() for p in timm.create_model('vgg16', device='meta').features.parameters())
    assert model.num_features == 1024 and model.head_hidden_size == 2048
    feats = model.forward_features(torch.empty(1, 3, 64, 64, device='meta'))
    assert feats.shape == (1, 1024, 2, 2)


@pytest.mark.parametrize('body', ['resnet18', 'regnety_002', 'vit_tiny_patch16_224'])
def test_body_without_weights_has_the_bare_timm_init(body):
    model = small(body, img_size=224)
    torch.manual_seed(0)
    bare = timm.create_model(body, num_classes=0)
    bare_state = bare.state_dict()
    for name, t in model.body.state_dict().items():
        ref = bare_state[name]
        # same init as the bare model: every zero-initialised tensor (last norm of a residual
        # block, biases, ...) and every one-initialised tensor stays so, the rest has its spread
        assert torch.equal(t == 0, ref == 0) or t.numel() == 1, name
        assert torch.equal(t == 1, ref == 1) or t.numel() == 1, name
        if t.is_floating_point() and t.numel() > 100 and ref.std() > 0:
            assert 0.8 < t.std().item() / ref.std().item() < 1.25, name
    if body == 'resnet18':  # timm zero-inits the last BN of each residual block
        assert sum(1 for n, t in model.body.state_dict().items() if n.endswith('bn2.weight') and not t.any()) == 8


def test_eval_returns_mean_of_heads_train_returns_pair():
    model = small(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    heads = model.forward_per_head(x)
    torch.testing.assert_close(model(x), (heads['ssa'] + heads['fe']) / 2)
    model.train()
    assert isinstance(model(x), torch.Tensor)  # distilled training off: plain mean, like DeiT
    model.set_distilled_training(True)
    z_ssa, z_fe = model(x)
    assert z_ssa.shape == z_fe.shape == (2, 4)


def test_forward_features_carries_body_map_then_attended_map():
    model = small(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    body_map = model.body.forward_features(x)
    feats = model.forward_features(x)
    k = model.body_channels
    torch.testing.assert_close(feats[:, :k], body_map)
    torch.testing.assert_close(feats[:, k:], model.head.attn(body_map))
    # alpha starts at 0, so a fresh plus model attends to exactly F
    torch.testing.assert_close(feats[:, k:], body_map)


def test_pre_logits_determine_eval_logits():
    model = small(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size)
    w = model.head_hidden_size // 2
    expected = (model.head.ssa.fc(pre[:, :w]) + model.head.fe.fc(pre[:, w:])) / 2
    torch.testing.assert_close(model(x), expected)


def test_one_head_order_ssa_then_fe():
    """Maps are F then H; wherever heads are listed, SSA comes first (SSANet's docstring)."""
    model = small(num_classes=4)
    with torch.no_grad():
        model.head.attn.alpha.fill_(0.5)  # H != F
    ssa, fe = model.head.ssa, model.head.fe
    assert model.head.heads() == [ssa, fe] and model.get_classifier() == (ssa.fc, fe.fc)
    assert model.pretrained_cfg['classifier'] == ('head.ssa.fc', 'head.fe.fc')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        body_map = model.forward_body(x)
        feats = model.forward_features(x)
        k = model.body_channels
        torch.testing.assert_close(feats, torch.cat([body_map, model.head.attn(body_map)], dim=1))  # F, H
        model.eval()
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, torch.cat([ssa(feats[:, k:], pre_logits=True), fe(feats[:, :k], True)], 1))
        per_head = model.logits_per_head(feats)
        assert list(per_head) == ['ssa', 'fe']
        model.train().set_distilled_training(True)
        z_ssa, z_fe = model(x)  # SelfADLoss's order: the teacher first
    for z, head in ((z_ssa, 'ssa'), (z_fe, 'fe')):  # BatchNorm in train mode: compare with the train-mode dict
        torch.testing.assert_close(z, model.forward_per_head(x)[head])
    single = small(aggregation='no_attention', num_classes=4)
    assert single.get_classifier() is single.head.fe.fc and single.head.heads() == [single.head.fe]


def test_0_3_aliases_are_gone():
    assert not [n for n in ('attend', 'head_logits', 'forward_heads') if hasattr(SSANet, n)]
    assert not hasattr(ssa_timm, 'SSAHead') and 'SSAHead' not in ssa_timm.__all__


def test_reset_classifier_keeps_frozen_model_frozen_and_pool():
    model = small(num_classes=4, global_pool='max').requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, '')
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, model.num_features, 2, 2)
    model.reset_classifier(10, 'max')
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert all(h.global_pool.pool_type == 'max' for h in (model.head.fe, model.head.ssa))


def test_alpha_is_excluded_from_weight_decay_and_groups_split():
    model = small()  # cosine attention, ResNet-18's default: its temperature is not decayed either
    assert model.no_weight_decay() == {'head.attn.alpha', 'head.attn.logit_scale'}
    assert small(aggregation='no_alpha').no_weight_decay() == {'head.attn.logit_scale'}
    assert small(qk_norm=False).no_weight_decay() == {'head.attn.alpha'}  # the paper's attention
    assert small(aggregation='no_alpha', qk_norm=False).no_weight_decay() == set()
    groups = timm.models.group_parameters(model, model.group_matcher())
    head_group = max(groups)
    assert {n for n in groups[head_group]} >= {'head.attn.alpha', 'head.ssa.fc.weight', 'head.fe.fc.weight'}
    assert len(groups) > 2


def test_prune_removes_attention_and_heads():
    model = small(num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    body_map = model.body.forward_features(x)
    model.prune_intermediate_layers(len(model.feature_info), prune_head=True)
    assert model.head is None
    torch.testing.assert_close(model.forward_features(x), body_map)
    assert model.num_features == body_map.shape[1]
    with pytest.raises(RuntimeError, match='removed by prune_intermediate_layers'):
        model.reset_classifier(3)


def test_features_only_uses_forward_intermediates():
    model = timm.create_model('ssanet_resnet50_plus', features_only=True, out_indices=(2, 3, 4), device='meta')
    outs = model(torch.empty(1, 3, 64, 64, device='meta'))
    assert [o.shape[1] for o in outs] == [512, 1024, 2048]


@pytest.mark.parametrize('body', ['resnet18', 'convnext_atto', 'efficientnet_b0', 'test_resnet'])
def test_create_ssanet_on_other_bodies(body):
    model = small(body, 'multiply', num_classes=5).eval()
    assert isinstance(model, SSANet)
    x = torch.randn(2, 3, 96, 96)
    assert model(x).shape == (2, 5)
    assert model.pretrained_cfg['architecture'] == 'ssanet'
    assert model.pretrained_cfg['first_conv'].startswith('body.')
    assert model.forward_features(x).shape[1] == model.num_features


def test_names_parse_into_body_and_aggregation():
    assert ssa_timm.parse_ssanet_name('ssanet_inception_v3_no_alpha') == ('inception_v3', 'no_alpha')
    assert ssa_timm.parse_ssanet_name('ssanet_resnet18_alpha') == ('resnet18', 'alpha')
    model = ssa_timm.create_ssanet_by_name('ssanet_resnet18_no_attention', num_classes=2, device='meta')
    assert model.head.attn is None and model.body.__class__.__name__ == 'ResNet'
    for bad in ('resnet18_plus', 'ssanet_plus', 'ssanet_resnet18_sum'):
        with pytest.raises(ValueError, match='ssanet_<timm body>_<aggregation>'):
            ssa_timm.parse_ssanet_name(bad)


def test_registered_body_through_builder_and_bad_arguments():
    registered = create_ssanet('densenet121', 'alpha', num_classes=2, device='meta')
    assert registered.pretrained_cfg['architecture'] == 'ssanet_densenet121_alpha'
    # another tag than the registered one: the generic entrypoint; another input size: the registered name,
    # whose pretrained_cfg records the size it was built for
    assert create_ssanet('resnet18.tv_in1k', 'plus', device='meta').pretrained_cfg['architecture'] == 'ssanet'
    at_224 = create_ssanet('resnet18', 'plus', img_size=224, device='meta').pretrained_cfg
    assert at_224['architecture'] == 'ssanet_resnet18_plus' and at_224['input_size'] == (3, 224, 224)
    assert at_224['pool_size'] == (7, 7)
    with pytest.raises(ValueError, match='aggregation must be one of'):
        create_ssanet('resnet18', 'sum')
    with pytest.raises(ValueError, match="unknown timm model 'not_a_net'"):
        create_ssanet('not_a_net')
    with pytest.raises(TypeError):
        timm.create_model('ssanet_vgg16_plus', not_a_model_arg=1)


def test_head_options():
    model = small(num_classes=3, head_width=64, head_act_layer='relu', drop_rate=0.2)
    assert model.head.fe.fc_hidden.out_features == 64 and isinstance(model.head.ssa.act, torch.nn.ReLU)
    assert model.head_hidden_size == 128
    forced = timm.create_model('ssanet', body='test_resnet', num_classes=3, fused_attn=True)
    assert forced.head.attn.fused_attn_train and forced.head.attn.fused_attn_eval
    assert not small(num_classes=3, fused_attn=False).head.attn.fused_attn_eval


def test_bf16_and_meta_device():
    model = small(num_classes=3).eval().to(torch.bfloat16)
    assert model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    meta = timm.create_model('ssanet_vgg16_plus', device='meta')
    assert all(p.is_meta for p in meta.parameters())


def test_torchscript_matches_eager():
    model = small(num_classes=3).eval()
    model.head.attn.alpha.data.fill_(0.5)
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


def test_builder_on_a_body_without_hub_weights():
    @timm.models.register_model
    def ssa_test_body_without_weights(pretrained: bool = False, **kwargs):
        return timm.create_model('test_resnet', pretrained=pretrained, **kwargs)

    model = create_ssanet('ssa_test_body_without_weights', 'alpha', num_classes=4, img_size=64)
    assert model.pretrained_cfg.get('hf_hub_id') is None and model.pretrained_cfg['input_size'] == (3, 64, 64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    with pytest.raises(RuntimeError, match='has no pretrained weights'):
        create_ssanet('ssa_test_body_without_weights', pretrained=True)


def test_qk_norm_model_round_trips_and_skips_weight_decay(tmp_path):
    model = small(num_classes=3, qk_norm=True).eval()
    assert model.no_weight_decay() == {'head.attn.alpha', 'head.attn.logit_scale'}
    model.head.attn.alpha.data.fill_(0.5)
    model.head.attn.logit_scale.data.fill_(2.0)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert loaded.head.attn.qk_norm and float(loaded.head.attn.logit_scale) == 2.0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


@pytest.mark.parametrize('name', timm.list_models('ssanet*'))
def test_each_registered_name_pins_its_attention(name, tmp_path):
    """The paper's 25 names compute the paper's attention (unscaled dot products) by default: they are the
    reproduction. Every other registered name, the generic ``ssanet`` included, computes cosine attention
    (``qk_norm``); none has SAGAN's safeguard or the 1/sqrt(d) scale. ``default_qk_norm`` says the same
    and exports record the options."""
    model = timm.create_model(name, num_classes=2, device='meta')
    if name.endswith('_no_attention'):
        assert model.head.attn is None and ssa_timm.hub.attention_args(model) == {}
        assert ssa_timm.models.default_qk_norm(name) is False
        return
    cosine = name not in NAMES
    attn = model.head.attn
    assert (attn.qk_norm, attn.scale_attn, attn.sagan_qk) == (cosine, False, False)
    assert ssa_timm.models.default_qk_norm(name) is cosine
    assert ssa_timm.hub.attention_args(model) == {'qk_norm': cosine, 'scale_attn': False}


def test_exports_record_the_attention_they_were_trained_with(tmp_path):
    model = ssa_timm.create_ssanet_by_name('ssanet_test_resnet_plus', num_classes=2, img_size=32, qk_norm=True)
    ssa_timm.hub.export_model(model, str(tmp_path / 'qk'), ['a', 'b'])
    config = json.loads((tmp_path / 'qk' / 'config.json').read_text())
    assert config['model_args']['qk_norm'] is True and config['model_args']['scale_attn'] is False
    loaded = timm.create_model(f'local-dir:{tmp_path / "qk"}', pretrained=True)
    assert loaded.head.attn.qk_norm
