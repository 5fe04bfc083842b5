"""Any timm image model as a body: CNN maps, NHWC maps and token grids, across families."""
import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
from timm.models import ResNet, build_model_with_cfg, register_model, save_for_hf
from timm.models.resnet import BasicBlock

import ssa_timm
from ssa_timm import SelfADLoss, create_ssanet

# body -> (family, input size): at least 12 bodies from 8 families, small enough for a CPU test
FAMILIES = {
    'test_vit': ('vit', 64),
    'deit_tiny_distilled_patch16_224': ('deit (cls + distillation tokens)', 64),
    'eva02_tiny_patch14_224': ('eva02 (rope)', 56),
    'swin_tiny_patch4_window7_224': ('swin (NHWC)', 224),
    'test_convnext': ('convnext', 64),
    'test_efficientnet': ('efficientnet', 64),
    'mobilenetv3_small_050': ('mobilenetv3', 64),
    'regnetx_002': ('regnet', 64),
    'test_maxvit': ('maxvit', 64),
    'fastvit_t8': ('fastvit (final conv kept)', 64),
    'test_coatnet': ('coatnet (conv + transformer hybrid)', 64),
    'test_resnet': ('resnet', 64),
}


def build(body: str, img_size: int, **kwargs) -> ssa_timm.SSANet:
    torch.manual_seed(0)
    return create_ssanet(body, 'plus', num_classes=5, img_size=img_size, **kwargs)


@pytest.mark.parametrize('body', list(FAMILIES))
def test_body_family_trains_and_round_trips(body, tmp_path):
    _, size = FAMILIES[body]
    model = build(body, size)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 4])

    # F is the body's final map as (B, K, H, W), with K = the body's own feature width
    body_map = model.forward_body(x)
    assert body_map.ndim == 4 and body_map.shape[1] == model.body_channels
    assert body_map.shape[2:] == model.pretrained_cfg['pool_size']

    # a Self-AD step: every parameter gets a gradient
    model.train().set_distilled_training(True)
    SelfADLoss()(model(x), y).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
        logits = model(x)
        eval_map = model.forward_body(x)
    torch.testing.assert_close(final, features)
    assert len(intermediates) == len(model.feature_info)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), features)

    features_only = timm.create_model(
        'ssanet', body=body, img_size=size, features_only=True, out_indices=(-2, -1)).eval()
    maps = features_only(x)
    assert [m.shape[1] for m in maps] == [i['num_chs'] for i in model.feature_info[-2:]]

    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits)

    # pruned as timm prunes (prune_head=True), the model ends at the body's last tap, as an NCHW map:
    # that is F, except for bodies with layers after their last tap (EfficientNet's conv_head,
    # FastViT's final conv), which timm's pruning removes with the head
    loaded.prune_intermediate_layers(len(loaded.feature_info), prune_head=True)
    with torch.no_grad():
        pruned = loaded.forward_features(x)
    assert pruned.shape[1] == loaded.num_features == model.feature_info[-1]['num_chs']
    assert pruned.shape[2:] == eval_map.shape[2:]
    if pruned.shape[1] == model.body_channels:
        torch.testing.assert_close(pruned, eval_map)


def test_token_bodies_drop_prefix_tokens_and_restore_the_grid():
    model = build('deit_tiny_distilled_patch16_224', 96).eval()
    assert model.map_fmt == 'NLC' and model.num_prefix_tokens == 2
    x = torch.randn(1, 3, 96, 96)
    tokens = model.body.forward_features(x)  # (1, 2 + 6*6, 192), norm applied
    grid = model.forward_body(x)
    assert tokens.shape == (1, 38, 192) and grid.shape == (1, 192, 6, 6)
    torch.testing.assert_close(grid[0, :, 1, 2], tokens[0, 2 + 1 * 6 + 2])  # row 1, column 2
    # dynamic_img_size: the same model reads a non-square input of another size
    assert model.forward_body(torch.randn(1, 3, 64, 128)).shape == (1, 192, 4, 8)


def test_swin_map_is_permuted_from_nhwc():
    model = build('swin_tiny_patch4_window7_224', 224).eval()
    x = torch.randn(1, 3, 224, 224)
    assert model.map_fmt == 'NHWC'
    torch.testing.assert_close(model.forward_body(x), model.body.forward_features(x).permute(0, 3, 1, 2))


def test_fastvit_keeps_its_final_conv():
    model = build('fastvit_t8', 64)
    assert model.body_channels == 768 and hasattr(model.body.final_conv, 'reparameterize')
    assert not [n for n in model.state_dict() if n.startswith('body.head.')]


class _PooledResNet(ResNet):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(x).mean((2, 3))


@register_model
def ssa_test_pooled_body(pretrained: bool = False, **kwargs) -> ResNet:
    return build_model_with_cfg(
        _PooledResNet, 'test_resnet', pretrained, block=BasicBlock, layers=[1, 1, 1, 1], **kwargs)


def test_body_without_spatial_map_is_refused_at_construction():
    with pytest.raises(ValueError, match="'ssa_test_pooled_body' has no spatial feature map"):
        create_ssanet('ssa_test_pooled_body', 'plus', img_size=64)


def _layer_ids(model: nn.Module, prefix: str = '') -> dict:
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=False))
    return {n[len(prefix):]: gid for gid, names in groups.items() for n in names if n.startswith(prefix)}


@pytest.mark.parametrize('body,size', [
    ('resnet18', 64), ('densenet121', 64), ('efficientnet_b0', 64), ('test_vit', 64),
    ('swin_tiny_patch4_window7_224', 224),
])
def test_group_matcher_gives_body_parameters_the_bare_models_layer_ids(body, size):
    model = build(body, size, device='meta')
    bare = timm.create_model(body, device='meta', **({'img_size': size} if 'vit' in body or 'swin' in body else {}))
    ours, theirs = _layer_ids(model, 'body.'), _layer_ids(bare)
    assert ours and all(ours[n] == theirs[n] for n in ours)
    everything = _layer_ids(model)
    assert everything['head.fe.fc.weight'] == max(everything.values())  # the SSA head module: the last group


def test_layer_decay_puts_the_stem_in_the_first_group():
    model = build('resnet18', 64)
    optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, layer_decay=0.75)
    scale = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    params = dict(model.named_parameters())
    stem = scale[id(params['body.conv1.weight'])]
    assert scale[id(params['body.bn1.weight'])] == stem == min(scale.values()) == pytest.approx(0.75 ** 9)  # 10 groups
    assert scale[id(params['head.fe.fc.weight'])] == 1.0


def test_torchvision_backbone_with_the_reusable_head_trains_with_self_ad():
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    backbone = create_feature_extractor(resnet18(), return_nodes={'layer4': 'map'})
    heads = ssa_timm.SSAHeads(512, num_classes=3, aggregation='plus', width=64)
    optimizer = torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=0.01)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 1])
    heads.set_distilled_training(True)
    losses = []
    for _ in range(3):
        z_ssa, z_fe = heads(backbone(x)['map'])
        loss = SelfADLoss()((z_ssa, z_fe), y)
        optimizer.zero_grad()
        loss.backward()
        assert heads.attn.alpha.grad is not None
        assert dict(backbone.named_parameters())['layer4.1.conv2.weight'].grad is not None
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    heads.eval()
    with torch.no_grad():
        fmap = backbone(x)['map']
        per_head = heads.logits_per_head(heads.forward_features(fmap))
        torch.testing.assert_close(heads(fmap), (per_head['ssa'] + per_head['fe']) / 2)


def test_old_checkpoint_keys_still_load(tmp_path):
    model = build('test_resnet', 64).eval()
    old = {k.replace('head.attn.', 'attn.').replace('head.ssa.', 'head_ssa.').replace('head.fe.', 'head_fe.'): v
           for k, v in model.state_dict().items()}
    assert 'attn.alpha' in old and 'head_ssa.fc.weight' in old
    from safetensors.torch import save_file
    save_file(old, tmp_path / 'old.safetensors')
    overlay = dict(file=str(tmp_path / 'old.safetensors'), num_classes=5)
    reloaded = timm.create_model('ssanet', body='test_resnet', img_size=64, num_classes=5, pretrained=True,
                                 pretrained_cfg_overlay=overlay).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))


def test_generic_entrypoint_with_body_args_and_weights_notes():
    model = timm.create_model('ssanet', body='convnext_atto', aggregation='no_attention', img_size=64, num_classes=3)
    cfg = model.pretrained_cfg
    assert cfg['pool_size'] == (2, 2) and cfg['first_conv'] == 'body.stem.0' and cfg['crop_mode'] == 'squash'
    assert cfg['hf_hub_id'] is None and 'without pretrained weights' in cfg['notes'][0]
    assert model.head.attn is None and model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)



@pytest.mark.parametrize('body,img_size,message', [
    ('resnet18', 0, r'img_size must be a positive number of pixels, got \(0, 0\)'),
    ('resnet18', -5, r'img_size must be a positive number of pixels, got \(-5, -5\)'),
    ('vit_tiny_patch16_224', 8, 'VisionTransformer cannot read a 8x8 px input'),
])
def test_input_sizes_a_body_cannot_read_are_refused_at_construction(body, img_size, message):
    with pytest.raises(ValueError, match=message):
        create_ssanet(body, 'plus', img_size=img_size)


def test_body_feature_index_reads_an_earlier_map(tmp_path):
    model = create_ssanet('resnet18', 'plus', num_classes=3, img_size=64, body_feature_index=2).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_body(x).shape == (2, 128, 8, 8)  # layer2: stride 8, 128 channels
    assert model.map_reduction == 8 and len(model.feature_info) == 3
    assert isinstance(model.body.layer4, torch.nn.Identity) or not list(model.body.layer4.parameters())
    save_for_hf(model, str(tmp_path / 'export'), safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True).eval()
    assert loaded.forward_body(x).shape == (2, 128, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    token = create_ssanet('test_vit', 'plus', num_classes=3, img_size=64, body_feature_index=0)
    assert len(token.body.blocks) == 1 and token.forward_body(x).shape[-2:] == (4, 4)
    with pytest.raises(ValueError, match=r'body_feature_index must be in \[-5, 5\)'):
        create_ssanet('resnet18', 'plus', num_classes=3, img_size=64, body_feature_index=7)
