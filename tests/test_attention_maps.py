"""ssa_timm.attention_maps in-process: the SSA attention S and its views, positions under a pixel, the
maps resized and drawn over an image, Grad-CAM on H (on F without attention) as Grad-CAM defines it."""
import sys

import numpy as np
import pytest
import torch

import ssa_timm
from ssa_timm.attention_maps import (attention_maps, grad_cam, mark_query, overlay, query_at, query_attention,
                                     target_layer, upsample)
from ssa_timm.errors import UserError


@pytest.fixture(scope='module')
def model():
    """timm's test_resnet read after layer1: a 16 x 16 SSA map (256 positions) at 64 px."""
    torch.manual_seed(0)
    return ssa_timm.create_ssanet_by_name('ssanet_test_resnet_plus', num_classes=3, img_size=64,
                                          body_feature_index=1).eval()


@pytest.fixture(scope='module')
def x():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_attention_maps_are_the_ssa_layer_s_attention_and_its_views(model, x):
    with torch.no_grad():
        body_map = model.forward_body(x)
        _, expected = model.head.attn.forward_with_attention(body_map)
    maps = attention_maps(model, body_map)
    attn = maps['attention']
    assert attn.shape == (256, 256) and body_map.shape[-2:] == (16, 16)
    np.testing.assert_array_equal(attn, expected[0].numpy())
    np.testing.assert_allclose(attn.sum(-1), np.ones(256), atol=1e-5)  # row j: query j over all positions
    np.testing.assert_allclose(maps['attention_mean'], attn.mean(0).reshape(16, 16), atol=1e-7)
    top = int(maps['top_query'])
    assert top == int(attn.mean(0).argmax()) and maps['top_query'].shape == ()
    np.testing.assert_array_equal(maps['attention_top'], attn[top].reshape(16, 16))
    assert not np.allclose(attn[0], attn[255])  # rows differ: the views pick the right one
    np.testing.assert_array_equal(query_attention(attn, top, (16, 16)), maps['attention_top'])
    np.testing.assert_array_equal(query_attention(attn, 17, (16, 16))[1, 1], attn[17, 17])  # row-major


def test_query_attention_refuses_positions_and_shapes_that_do_not_fit():
    attn = np.eye(6, dtype=np.float32)
    np.testing.assert_array_equal(query_attention(attn, 4, (2, 3)), [[0, 0, 0], [0, 1, 0]])
    for query in (-1, 6):
        with pytest.raises(ValueError, match=rf'query position {query} is outside 0\.\.5'):
            query_attention(attn, query, (2, 3))
    with pytest.raises(ValueError, match='a 3 x 3 map has 9 positions, the attention 6'):
        query_attention(attn, 0, (3, 3))


def test_query_at_maps_a_pixel_of_the_squashed_image_to_its_position():
    size, shape = (200, 100), (4, 8)  # a 200 x 100 image squashed onto a 4 x 8 map (rows x columns)
    assert query_at(0, 0, size, shape) == 0
    assert query_at(199, 99, size, shape) == 31  # the last row and column
    assert query_at(25, 0, size, shape) == 1 and query_at(24.9, 0, size, shape) == 0  # columns 25 px wide
    assert query_at(0, 25, size, shape) == 8 and query_at(0, 24.9, size, shape) == 0  # rows 25 px high
    assert query_at(120, 60, size, shape) == 2 * 8 + 4
    assert query_at(500, -3, size, shape) == 7  # clamped to the border


def test_upsample_resizes_bilinearly_and_scales_to_0_1():
    m = np.array([[0., 1.], [2., 3.]], dtype=np.float32)
    up = upsample(m, (4, 6))
    assert up.shape == (4, 6) and up.dtype == np.float32
    assert up.min() == 0 and up.max() == pytest.approx(1, abs=1e-6)
    assert up[0, 0] == 0 and up[-1, -1] == pytest.approx(1, abs=1e-6)
    expected = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(4, 6), mode='bilinear',
                                               align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(up, expected / 3, atol=1e-6)
    assert (upsample(np.full((3, 3), 5.0), (6, 6)) == 0).all()  # a flat map has nothing to show


def manual_grad_cam(model, x, layer, target) -> np.ndarray:
    """Grad-CAM by its definition: ReLU(sum_k mean(dy/dA_k) A_k), at the layer's resolution."""
    saved = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: saved.update(a=output))
    try:
        logits = model(x)
    finally:
        handle.remove()
    grads, = torch.autograd.grad(logits[0, target], saved['a'])
    weights = grads.mean((-2, -1), keepdim=True)
    return torch.relu((weights * saved['a']).sum(1))[0].detach().numpy()


@pytest.mark.parametrize('name', ['ssanet_test_resnet_plus', 'ssanet_test_resnet_no_attention'])
def test_grad_cam_explains_the_target_class_on_h_or_f(name, x):
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet_by_name(name, num_classes=3, img_size=64, body_feature_index=1).eval()
    layer = target_layer(model)
    if name.endswith('no_attention'):
        assert layer is model.get_submodule('body.layer1')  # the body's last stage: F
    else:
        assert layer is model.head.attn  # the SSA layer: H
    cams = [grad_cam(model, x, target) for target in range(3)]
    assert not layer._forward_hooks and not layer._backward_hooks  # Grad-CAM's hooks are gone
    for target, cam in enumerate(cams):
        assert cam.shape == (64, 64) and cam.min() >= 0 and cam.max() <= 1
        low = manual_grad_cam(model, x, layer, target)
        mine = upsample(low, (64, 64))
        assert np.corrcoef(mine.ravel(), cam.ravel())[0, 1] > 0.999, target
    assert np.abs(cams[0] - cams[1]).max() > 0.1  # the target class matters


def test_overlay_draws_jet_colours_over_the_image():
    rgb = np.full((8, 10, 3), 0.5, dtype=np.float32)
    heat = np.zeros((8, 10), dtype=np.float32)
    heat[:, 5:] = 1
    picture = overlay(rgb, heat)
    assert picture.shape == (8, 10, 3) and picture.dtype == np.uint8
    cold, hot = picture[0, 0].astype(int), picture[0, 9].astype(int)
    assert cold[2] > cold[0] and hot[0] > hot[2]  # 0: blue, 1: red
    assert (picture[:, :5] == picture[0, 0]).all()


def test_mark_query_outlines_the_cell_of_the_position():
    picture = np.zeros((40, 80, 3), dtype=np.uint8)
    marked = mark_query(picture, 1 * 8 + 3, (4, 8))  # row 1, column 3 of a 4 x 8 map: pixels 10..19 x 30..39
    assert (picture == 0).all() and marked.shape == picture.shape  # a copy
    changed = np.argwhere(marked.any(-1))
    assert changed[:, 0].min() == 10 and changed[:, 0].max() == 19
    assert changed[:, 1].min() == 30 and changed[:, 1].max() == 39
    assert (marked[10, 30:40] == 255).all() and (marked[19, 30:40] == 255).all()  # the outline ...
    assert (marked[11:19, 31:39] == 0).all()  # ... and not the inside
    assert (mark_query(picture, 0, (4, 8), color=(255, 0, 0))[0, 0] == [255, 0, 0]).all()
    with pytest.raises(ValueError, match='query position 32 is outside a 4 x 8 map'):
        mark_query(picture, 32, (4, 8))


def test_without_the_grad_cam_package_a_user_error_says_what_to_install(model, x, monkeypatch):
    monkeypatch.setitem(sys.modules, 'pytorch_grad_cam', None)
    with pytest.raises(UserError, match=r"Grad-CAM needs the grad-cam package .*pip install \"ssa-timm\[vis\]\""):
        grad_cam(model, x, 0)
    with pytest.raises(UserError, match='grad-cam package'):
        overlay(np.zeros((2, 2, 3)), np.zeros((2, 2)))
