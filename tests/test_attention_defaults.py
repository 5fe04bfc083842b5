"""Which attention a model computes when nobody says: the paper's 25 names keep the paper's unscaled dot
products, every other model (the curated modern names, the generic ``ssanet``, ``create_ssanet`` over any
timm body) computes cosine attention (``qk_norm``); an explicit argument wins, exports record what they
were trained with. (Every registered name is pinned in ``tests/test_model.py``; exports written before the
default changed in ``tests/test_model_folders.py``.)"""
import json

import pytest
import timm
import torch

import ssa_timm
from ssa_timm.errors import WeightsMismatch
from ssa_timm.hub import attention_args, export_model
from ssa_timm.models import default_qk_norm

# ResNet-18's stem alone (64 x 16 x 16 at 32 px) and narrow heads: a real modern name, built in milliseconds
TINY = dict(num_classes=3, img_size=32, body_feature_index=0, head_width=64)


def attention(model) -> tuple:
    attn = model.head.attn
    return attn.qk_norm, attn.scale_attn, attn.sagan_qk


def test_create_ssanet_over_any_timm_body_defaults_to_qk_norm():
    for model in (ssa_timm.create_ssanet('test_resnet', 'plus', img_size=32),
                  ssa_timm.create_ssanet_by_name('ssanet_test_resnet_alpha', img_size=32),
                  timm.create_model('ssanet', body='test_vit', aggregation='multiply', img_size=32)):
        assert model.pretrained_cfg['architecture'] == 'ssanet'
        assert attention(model) == (True, False, False)
        assert 'head.attn.logit_scale' in model.state_dict()
    # the paper's bodies keep the paper's attention under any tag, through the generic entrypoint too
    for model in (ssa_timm.create_ssanet('resnet50.a1_in1k', 'plus', device='meta'),
                  timm.create_model('ssanet', body='vgg16', device='meta')):
        assert model.pretrained_cfg['architecture'] == 'ssanet' and attention(model) == (False, False, False)
    no_attention = ssa_timm.create_ssanet('test_resnet', 'no_attention', img_size=32)
    assert no_attention.head.attn is None and 'qk_norm' not in timm.models.get_model_args(no_attention)


def test_default_qk_norm_names_each_default():
    assert default_qk_norm('ssanet') is True  # the generic entrypoint over its default body, resnet18
    assert default_qk_norm('ssanet_resnet18_plus') is True
    assert default_qk_norm('ssanet_swin_tiny_patch4_window7_224_plus.ms_in1k') is True
    assert default_qk_norm('ssanet_convnext_small_multiply') is True  # not registered: create_ssanet's
    assert default_qk_norm('ssanet_vgg16_no_alpha') is False
    assert default_qk_norm('ssanet_resnet50_plus.a1_in1k') is False  # a paper body under another tag
    assert default_qk_norm('ssanet_resnet18_no_attention') is False  # no attention at all
    with pytest.raises(ValueError, match="expected a name 'ssanet_<timm body>_<aggregation>'"):
        default_qk_norm('resnet18')


def test_an_explicit_argument_wins_over_the_default():
    paper_on_modern = timm.create_model('ssanet_resnet18_plus', qk_norm=False, **TINY)
    assert attention(paper_on_modern) == (False, False, False)
    assert 'head.attn.logit_scale' not in paper_on_modern.state_dict()
    cosine_on_paper = timm.create_model('ssanet_resnet50_plus', qk_norm=True, **TINY)
    assert attention(cosine_on_paper) == (True, False, False)
    # None means "the default" (a recipe's unset flag)
    assert attention(timm.create_model('ssanet_resnet18_plus', qk_norm=None, **TINY)) == (True, False, False)
    assert attention(ssa_timm.models.ssanet.ssanet_resnet18_plus(qk_norm=None, **TINY)) == (True, False, False)


@pytest.mark.parametrize('name', ['ssanet_resnet18_plus', 'ssanet'])
def test_scale_attn_and_sagan_qk_turn_the_default_off(name):
    """They exclude qk_norm (``SpatialSelfAttention`` refuses the pairs), so the default yields to them;
    asked for together with them, qk_norm is still refused."""
    assert attention(timm.create_model(name, scale_attn=True, **TINY)) == (False, True, False)
    assert attention(timm.create_model(name, sagan_qk=True, **TINY)) == (False, False, True)
    with pytest.raises(ValueError, match='qk_norm and scale_attn exclude each other'):
        timm.create_model(name, scale_attn=True, qk_norm=True, **TINY)
    with pytest.raises(ValueError, match='sagan_qk sets the width'):
        timm.create_model(name, sagan_qk=True, qk_norm=True, **TINY)


def test_exports_of_a_modern_name_record_and_keep_qk_norm(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('ssanet_resnet18_plus', **TINY).eval()
    with torch.no_grad():
        model.head.attn.alpha.fill_(0.5)
        model.head.attn.logit_scale.fill_(1.5)
    x = torch.randn(2, 3, 32, 32)
    export_model(model, str(tmp_path / 'export'), ['a', 'b', 'c'])
    timm.models.save_for_hf(model, tmp_path / 'plain', safe_serialization=True)  # timm's own export
    for folder in ('export', 'plain'):
        config = json.loads((tmp_path / folder / 'config.json').read_text())
        assert config['model_args']['qk_norm'] is True, folder
        loaded = timm.create_model(f'local-dir:{tmp_path / folder}', pretrained=True).eval()
        assert attention(loaded) == (True, False, False) and loaded.head.attn.logit_scale.item() == 1.5
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_weights_of_the_other_attention_say_which_qk_norm_to_pass(tmp_path):
    cosine = timm.create_model('ssanet_resnet18_plus', **TINY)
    export_model(cosine, str(tmp_path / 'cosine'), ['a', 'b', 'c'])
    paper = timm.create_model('ssanet_resnet18_plus', qk_norm=False, **TINY)
    export_model(paper, str(tmp_path / 'paper'), ['a', 'b', 'c'])
    with pytest.raises(WeightsMismatch, match=r"logit_scale'\]; the weights were trained with cosine attention: "
                                              'build the model with qk_norm=True'):
        timm.create_model(f'local-dir:{tmp_path / "cosine"}', pretrained=True, qk_norm=False)
    with pytest.raises(WeightsMismatch, match='trained with the paper\'s attention, so build the model with '
                                              'qk_norm=False'):
        timm.create_model(f'local-dir:{tmp_path / "paper"}', pretrained=True, qk_norm=True)
    assert attention_args(timm.create_model(f'local-dir:{tmp_path / "paper"}', pretrained=True)) == {
        'qk_norm': False, 'scale_attn': False}
