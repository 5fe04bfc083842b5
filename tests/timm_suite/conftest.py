"""Run timm's own ``tests/test_models.py`` against the ``ssanet`` / ``ssanet_*`` models.

timm's test module is not committed: ``tests/timm_suite/run.sh`` fetches it from the sdist of the
installed timm version. Importing ``ssa_timm`` here registers the models before collection, and
``timm.list_models`` / ``timm.list_pretrained`` are narrowed to them (the ``module`` filter is
ignored, so the ``forward_intermediates`` / prune tests that timm runs per model module run on
ours too). Tests parametrized over hard-coded timm model names are deselected, and so are the
tests that download pretrained weights (covered offline by ``tests/test_pretrained.py``).
By default the run covers CI's subset: the generic ``ssanet`` (ResNet-18 body) and one name for
each other body family, together covering every aggregation (``_CI_SUBSET``). ``SSANET_MODELS`` (fnmatch patterns, comma
separated) picks another set; ``SSANET_MODELS='ssanet,ssanet_*'`` is the full run over all 38 names.
"""
import fnmatch
import os

import timm
import timm.models

import ssa_timm  # noqa: F401  (registers the models)

# CI's subset: every body family and every aggregation once; SSANET_MODELS='ssanet,ssanet_*' is the full run
_CI_SUBSET = ','.join([
    'ssanet', 'ssanet_vgg16_multiply', 'ssanet_resnet50_alpha', 'ssanet_inception_v3_no_alpha',
    'ssanet_densenet121_no_attention', 'ssanet_convnext_tiny_plus', 'ssanet_efficientnet_b0_plus',
    'ssanet_vit_small_patch16_384_plus', 'ssanet_eva02_tiny_patch14_336_plus',
    'ssanet_swin_tiny_patch4_window7_224_plus',
])
_PATTERNS = os.environ.get('SSANET_MODELS', _CI_SUBSET).split(',')
_list_models = timm.list_models
_DOWNLOAD_TESTS = ('test_model_inference', 'test_model_load_pretrained', 'test_model_features_pretrained')


def _ours(name: str) -> bool:
    return any(fnmatch.fnmatch(name.split('.')[0], p) for p in _PATTERNS)


def _list_ours(filter='', module='', pretrained=False, exclude_filters='', name_matches_cfg=False, include_tags=None):
    names = _list_models(
        filter=filter or 'ssanet*', pretrained=pretrained, exclude_filters=exclude_filters,
        name_matches_cfg=name_matches_cfg, include_tags=include_tags)
    return [n for n in names if _ours(n)]


def _list_pretrained_ours(filter='', exclude_filters=''):
    return _list_ours(filter=filter, pretrained=True, exclude_filters=exclude_filters, include_tags=True)


timm.list_models = timm.models.list_models = _list_ours
timm.list_pretrained = timm.models.list_pretrained = _list_pretrained_ours


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        name = params.get('model_name')
        if item.originalname in _DOWNLOAD_TESTS or not isinstance(name, str) or not _ours(name):
            drop.append(item)
        else:
            keep.append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_configure(config):
    # the markers timm's own pyproject.toml declares
    for marker in ('base', 'cfg', 'cfg_nonstd', 'forward', 'backward', 'torchscript', 'features', 'fxforward',
                   'fxbackward', 'timeout'):
        config.addinivalue_line('markers', marker)
