"""The attention-guided zoom (``ssa_timm.zoom``, ``SSANet(zoom=True)``, ``train.py --zoom``): the box drawn
from an attention map, the crop, both passes in training and in the output, exports that keep it, its
box against the true part, and what ``predict.py`` reports."""
import json
from pathlib import Path

import pytest
import torch

import ssa_timm
from recipe_runs import TINY_TRAIN, run_main
from ssa_timm.hub import export_model, load_model
from ssa_timm.localization import ImageBoxes, localization_report
from ssa_timm.zoom import attention_box, box_hits, box_iou, zoom_crop


def mass(rows: int, cols: int, hot: dict) -> torch.Tensor:
    """A ``(1, rows, cols)`` map of attended mass: 0.01 everywhere, ``hot`` cells ``{(r, c): value}``."""
    m = torch.full((1, rows, cols), 0.01)
    for (r, c), v in hot.items():
        m[0, r, c] = v
    return m


def test_the_box_covers_the_cells_over_the_threshold_of_the_maximum():
    # a 4 x 8 map (rows x columns): cells (1, 5) and (2, 6) are over half the maximum, (3, 0) is not
    box = attention_box(mass(4, 8, {(1, 5): 1.0, (2, 6): 0.6, (3, 0): 0.4}), threshold=0.5, margin=0, min_size=0.1)
    assert box.tolist() == [[5 / 8, 1 / 4, 7 / 8, 3 / 4]]  # columns 5-6, rows 1-2: x from columns, y from rows
    lower = attention_box(mass(4, 8, {(1, 5): 1.0, (2, 6): 0.6, (3, 0): 0.4}), threshold=0.3, margin=0, min_size=0.1)
    assert lower.tolist() == [[0.0, 1 / 4, 7 / 8, 1.0]]  # (3, 0) joins


def test_margin_minimum_size_and_the_image_edge():
    one_cell = mass(4, 4, {(1, 1): 1.0})
    assert attention_box(one_cell, margin=0.5, min_size=0.1).tolist() == [[0.125, 0.125, 0.625, 0.625]]
    assert attention_box(one_cell, margin=0, min_size=0.5).tolist() == [[0.125, 0.125, 0.625, 0.625]]
    # at a corner the box is shifted inside the image, not shrunk
    corner = attention_box(mass(4, 4, {(0, 3): 1.0}), margin=0, min_size=0.5)
    assert corner.tolist() == [[0.5, 0.0, 1.0, 0.5]]
    everywhere = attention_box(torch.ones(2, 3, 5), margin=0.2, min_size=0.25)
    assert everywhere.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2


def test_the_crop_is_a_manual_crop_of_the_same_box():
    # 4 x 4 blocks of constant value: a crop on block edges to one pixel a block is the blocks themselves
    blocks = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    images = blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 32 x 48
    boxes = torch.tensor([[8 / 48, 4 / 32, 32 / 48, 20 / 32], [0.0, 0.0, 1.0, 1.0]])
    crops = zoom_crop(images, boxes, (4, 6))
    torch.testing.assert_close(crops[0], blocks[0, :, 1:5, 2:8])
    torch.testing.assert_close(zoom_crop(images[1:], boxes[1:], (8, 12))[0], blocks[1])


def test_box_iou_and_hits():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]])
    truth = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.4, 0.4, 0.9, 0.9]])
    assert box_iou(boxes, truth).tolist() == pytest.approx([1.0, 0.01 / 0.49])
    assert box_hits(boxes, truth).tolist() == [True, False]


def zoom_model(**kwargs):
    torch.manual_seed(0)
    return ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=3, img_size=32, body_feature_index=2, zoom=True,
                                  **kwargs)


def test_the_output_is_the_mean_of_the_full_and_the_zoomed_pass():
    model = zoom_model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full, zoomed, boxes = model.forward_zoom_features(x)
        crops = zoom_crop(x, boxes, (32, 32))
        expected = (model.forward_head(model.forward_features(x))
                    + model.forward_head(model.forward_features(crops))) / 2
        torch.testing.assert_close(model(x), expected)
        logits, same_boxes = model.forward_with_zoom_box(x)
        torch.testing.assert_close(logits, expected)
        per_head = model.forward_per_head(x)
    torch.testing.assert_close((per_head['ssa'] + per_head['fe']) / 2, expected)
    assert torch.equal(boxes, same_boxes) and boxes.shape == (2, 4)


def test_both_passes_get_the_self_ad_loss_and_the_box_gets_no_gradient():
    model = zoom_model().train()
    model.set_distilled_training(True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = model(x)
    assert isinstance(out, list) and len(out) == 2 and all(len(pair) == 2 for pair in out)
    loss_fn = ssa_timm.SelfADLoss()
    loss = loss_fn(out, y)
    torch.testing.assert_close(loss, (loss_fn(out[0], y) + loss_fn(out[1], y)) / 2)
    loss.backward()
    assert model.head.attn.conv_a.weight.grad is not None  # the attention learns through the full pass
    _, boxes = model.zoom_boxes(model.forward_body(x))
    assert not boxes.requires_grad


@pytest.mark.parametrize('body, body_kwargs', [
    ('test_vit', {}),  # tokens (NLC) with a class token
    ('swin_tiny_patch4_window7_224', dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)),
])
def test_the_zoom_over_token_bodies_trains_and_draws_its_box_from_their_grid(body, body_kwargs):
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet(body, 'plus', num_classes=3, img_size=64, zoom=True, body_kwargs=body_kwargs)
    model.train().set_distilled_training(True)
    x = torch.randn(2, 3, 64, 64)
    loss = ssa_timm.SelfADLoss()(model(x), torch.tensor([0, 1]))
    loss.backward()
    assert model.head.attn.conv_a.weight.grad is not None and torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        logits, boxes = model.forward_with_zoom_box(x)
        body_map = model.forward_body(x)
        _, expected = model.zoom_boxes(body_map)
        crops = zoom_crop(x, expected, (64, 64))
        torch.testing.assert_close(logits, (model.forward_head(torch.cat([body_map, model.head.attn(body_map)], 1))
                                            + model.forward_head(model.forward_features(crops))) / 2)
    assert torch.equal(boxes, expected) and logits.shape == (2, 3)


def test_zoom_needs_the_attention():
    with pytest.raises(ValueError, match="no_attention' has none"):
        ssa_timm.create_ssanet('test_resnet', 'no_attention', num_classes=3, img_size=32, zoom=True)
    with pytest.raises(ValueError, match='zoom_threshold must be in'):
        zoom_model(zoom_threshold=0)


def test_an_export_keeps_the_zoom_with_equal_outputs(tmp_path):
    model = zoom_model(zoom_margin=0.2).eval()
    folder = export_model(model, str(tmp_path / 'best'), ['a', 'b', 'c'])
    args = json.loads((folder / 'config.json').read_text())['model_args']
    assert args['zoom'] is True and args['zoom_margin'] == 0.2 and args['zoom_threshold'] == 0.5
    loaded = load_model(str(folder)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.zoom and loaded.zoom_margin == 0.2


def test_the_zoom_box_and_the_grad_cam_box_are_measured_against_the_true_part():
    from ssa_timm.localization import grad_cam_grid
    model = zoom_model().eval()
    data = [(torch.rand(model.body_channels, 4, 4), i % 3) for i in range(3)]
    boxes = {i: ImageBoxes([(0, 0, 8, 8)], (32, 32)) for i in range(3)}
    report = localization_report(model, data, boxes, body_maps=True)
    maps = torch.stack([f for f, _ in data])
    truth = torch.tensor([[0, 0, 0.25, 0.25]]).repeat(3, 1)
    with torch.no_grad():
        _, drawn = model.zoom_boxes(maps)
    assert report['zoom_iou'] == pytest.approx(box_iou(drawn, truth).mean().item(), rel=1e-5)
    assert report['zoom_hit'] == pytest.approx(box_hits(drawn, truth).float().mean().item())
    cam_boxes = attention_box(grad_cam_grid(model, maps, torch.tensor([0, 1, 2])))
    assert report['cam_box_iou'] == pytest.approx(box_iou(cam_boxes, truth).mean().item(), rel=1e-5)
    # a model without the zoom: the box it would draw (default settings); without attention, Grad-CAM's only
    plain = ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=3, img_size=32, body_feature_index=2).eval()
    assert localization_report(plain, data, boxes, body_maps=True)['zoom_iou'] is not None
    bare = ssa_timm.create_ssanet('test_resnet', 'no_attention', num_classes=3, img_size=32, body_feature_index=2)
    bare_report = localization_report(bare, data, boxes, body_maps=True)
    assert bare_report['zoom_iou'] is None and 0 <= bare_report['cam_box_iou'] <= 1


def test_train_with_the_zoom_fine_tuned_and_frozen_with_and_without_the_cache_then_predict_reports_the_box(
        tmp_path):
    assert run_main('train', *TINY_TRAIN, '--zoom', '--epochs', '1', '--output-dir', str(tmp_path / 'tuned')) == 0
    config = json.loads((tmp_path / 'tuned' / 'best' / 'config.json').read_text())
    assert config['model_args']['zoom'] is True
    # frozen body on the scene task (boxes: the localisation reads the cached maps too); the cache serves the
    # first pass, the crops run through the body: the same numbers either way
    frozen = [*TINY_TRAIN, '--zoom', '--freeze-body', '--builtin-task', 'scene', '--epochs', '2']
    for name, extra in (('frozen', []), ('cached', ['--cache-features'])):
        assert run_main('train', *frozen, *extra, '--output-dir', str(tmp_path / name)) == 0
    plain, cached = (read_metrics(tmp_path / name) for name in ('frozen', 'cached'))
    assert len(plain) == len(cached) == 2
    for a, b in zip(plain, cached):
        assert b['train_loss'] == pytest.approx(a['train_loss'], rel=1e-4)
        assert b['val']['output']['top1'] == pytest.approx(a['val']['output']['top1'])
        for key in ('zoom_iou', 'zoom_hit', 'in_box_mass'):
            assert b['val']['localization'][key] == pytest.approx(a['val']['localization'][key], rel=1e-4)
        assert b['val']['attention']['entropy'] == pytest.approx(a['val']['attention']['entropy'], rel=1e-4)
    from PIL import Image
    Image.new('RGB', (60, 40), (200, 30, 30)).save(tmp_path / 'photo.png')
    output = tmp_path / 'predictions.json'
    assert run_main('predict', '--model', str(tmp_path / 'tuned' / 'best'), str(tmp_path / 'photo.png'),
                    '--format', 'json', '--output', str(output)) == 0
    (record,) = json.loads(output.read_text())
    x0, y0, x1, y1 = record['zoom_box']
    assert 0 <= x0 < x1 <= 60 and 0 <= y0 < y1 <= 40  # pixels of the 60 x 40 photo


def read_metrics(folder: Path):
    return [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()]


def test_onnx_export_of_a_zoom_model_passes_its_parity_check(tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    folder = export_model(zoom_model().eval(), str(tmp_path / 'best'), ['a', 'b', 'c'])
    onnx = tmp_path / 'model.onnx'
    assert run_main('export', '--model', str(folder), '--onnx', str(onnx)) == 0  # exit 1 past the tolerance
    report = json.loads(capsys.readouterr().out)
    assert onnx.is_file() and report['onnx']['max_abs_diff'] < 1e-4 and report['onnx']['batch_sizes'] == [1, 3]


def test_draw_box_outlines_the_box_in_fractions_of_the_picture():
    from ssa_timm.attention_maps import draw_box
    picture = draw_box(__import__('numpy').zeros((40, 60, 3), dtype='uint8'), [0.5, 0.25, 1.0, 0.75])
    assert tuple(picture[10, 40]) == (255, 220, 0) and tuple(picture[29, 59]) == (255, 220, 0)
    assert tuple(picture[20, 45]) == (0, 0, 0) and tuple(picture[5, 5]) == (0, 0, 0)  # inside, outside


def test_visualize_of_a_zoom_model_keeps_its_box(tmp_path):
    import numpy as np
    from PIL import Image
    folder = export_model(zoom_model().eval(), str(tmp_path / 'best'), ['a', 'b', 'c'])
    Image.new('RGB', (48, 48), (20, 120, 200)).save(tmp_path / 'photo.png')
    assert run_main('visualize', '--model', str(folder), str(tmp_path / 'photo.png'), '--output-dir',
                    str(tmp_path / 'vis')) == 0
    box = np.load(tmp_path / 'vis' / 'photo.npz')['zoom_box']
    assert box.shape == (4,) and 0 <= box[0] < box[2] <= 1 and (tmp_path / 'vis' / 'photo_attention.png').is_file()
    two = ['--model', str(folder), '--model', str(folder), str(tmp_path / 'photo.png')]
    assert run_main('visualize', *two, '--labels', 'first,second', '--output-dir', str(tmp_path / 'grid')) == 0
    assert (tmp_path / 'grid' / 'grid.png').is_file()
    assert run_main('visualize', *two, '--labels', 'one', '--output-dir', str(tmp_path / 'bad')) == 1


def test_a_zoom_model_refuses_torchscript_at_its_call():
    scripted = torch.jit.script(zoom_model().eval())
    with pytest.raises(Exception, match='cannot be scripted'):
        scripted(torch.randn(1, 3, 32, 32))


def test_the_model_card_and_transformers_pipeline_of_a_zoom_export(tmp_path, capsys):
    transformers = pytest.importorskip('transformers')
    from PIL import Image

    from ssa_timm.model_card import render_model_card
    model = zoom_model().eval()
    folder = export_model(model, str(tmp_path / 'best'), ['a', 'b', 'c'])
    template = (Path(__file__).resolve().parents[1] / 'model_cards' / 'template.md').read_text()
    card = str(render_model_card(load_model(str(folder)), 'zoomed', template, 32, f'local-dir:{folder}'))
    assert '**zoom on**' in card and 'second body pass' in card and 'paid on a frozen body' in card
    Image.new('RGB', (40, 30), (200, 60, 20)).save(tmp_path / 'photo.png')
    classifier = transformers.pipeline('image-classification', model=str(folder))
    hf_top = classifier(str(tmp_path / 'photo.png'), top_k=3)
    assert run_main('predict', '--model', str(folder), str(tmp_path / 'photo.png'), '--format', 'json') == 0
    ours = json.loads(capsys.readouterr().out)[0]
    assert [t['label'] for t in hf_top] == [t['label'] for t in ours['top']]
    assert [t['score'] for t in hf_top] == pytest.approx([t['prob'] for t in ours['top']], abs=1e-5)


def test_benchmark_measures_the_zooms_cost(tmp_path, capsys):
    output = tmp_path / 'bench.json'
    assert run_main('benchmark', '--sections', 'zoom', '--model', 'ssanet_test_resnet_plus', '--img-size', '32',
                    '--batch-size', '2', '--repeats', '1', '--output', str(output)) == 0
    zoom = json.loads(output.read_text())['zoom']
    for mode in ('train', 'frozen', 'infer'):  # body trained, body frozen (feature cache), inference
        m = zoom[mode]
        assert m['ratio'] == pytest.approx(m['zoom_ms'] / m['ms']) and m['images_per_s'] == pytest.approx(2e3 / m['ms'])
    out = capsys.readouterr().out
    assert '| train step |' in out and '| train step, frozen body (cache) |' in out
    assert run_main('benchmark', '--sections', 'zooom') == 2
