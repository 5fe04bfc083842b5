"""The localisation metrics (``ssa_timm.localization``): boxes on the feature grid through the squash
resize, in-box attention mass, the pointing game, Grad-CAM at grid resolution, boxes files, and
``evaluate.py --boxes`` on a CUB-layout dataset."""
import pytest
import torch

import ssa_timm
from dataset_layouts import make_cub
from recipe_runs import run_main
from ssa_timm.errors import UserError
from ssa_timm.localization import (
    ImageBoxes, attention_focus, batch_localization, box_mask, box_share, grad_cam_grid, in_box_mass,
    localization_report, pointing_hits, read_boxes)


def test_box_mask_maps_pixels_to_cells_through_the_squash():
    # a 200 x 100 image squashed onto a 4 x 4 grid: a cell is 50 x 25 pixels
    mask = box_mask([(0, 0, 50, 25)], (200, 100), (4, 4)).reshape(4, 4)
    assert mask.sum() == 1 and mask[0, 0]
    mask = box_mask([(100, 50, 100, 50)], (200, 100), (4, 4)).reshape(4, 4)
    assert mask[2:, 2:].all() and mask.sum() == 4
    # a box touching a cell covers it; two boxes are their union
    mask = box_mask([(49, 24, 2, 2), (199, 99, 1, 1)], (200, 100), (4, 4)).reshape(4, 4)
    assert mask[:2, :2].all() and mask[3, 3] and mask.sum() == 5
    with pytest.raises(ValueError, match='no area'):
        box_mask([(300, 0, 10, 10)], (200, 100), (4, 4))


def test_all_mass_in_the_box_scores_one_and_uniform_scores_the_share():
    n = 16
    masks = box_mask([(0, 0, 8, 8)], (16, 16), (4, 4))[None]  # 4 of 16 positions
    inside = masks[0].nonzero()[:, 0]
    focused = torch.zeros(1, n, n)
    focused[0, :, inside] = 1 / len(inside)
    assert in_box_mass(focused, masks).item() == pytest.approx(1.0)
    uniform = torch.full((1, n, n), 1 / n)
    assert in_box_mass(uniform, masks).item() == pytest.approx(0.25)
    assert box_share(masks).item() == pytest.approx(0.25)
    outside = torch.zeros(1, n, n)
    outside[0, :, n - 1] = 1
    assert in_box_mass(outside, masks).item() == 0


def test_pointing_game_hits_and_misses():
    masks = box_mask([(0, 0, 8, 8)], (16, 16), (4, 4)).repeat(2, 1)
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 0] = 5  # inside the top-left 2 x 2 box
    maps[1, 3, 3] = 5  # outside
    assert pointing_hits(maps, masks).tolist() == [True, False]
    attention = torch.zeros(1, 16, 16)
    attention[0, :, 5] = 1  # every query looks at position 5 = cell (1, 1), in the box
    assert attention_focus(attention).argmax().item() == 5
    assert pointing_hits(attention_focus(attention), masks[:1]).tolist() == [True]


def small_model(aggregation='plus'):
    torch.manual_seed(0)
    return ssa_timm.create_ssanet('test_resnet', aggregation, num_classes=3, img_size=32, body_feature_index=2).eval()


@pytest.mark.parametrize('aggregation', ['plus', 'no_attention'])
def test_grad_cam_follows_the_evidence(aggregation):
    model = small_model(aggregation)
    f = torch.rand(2, model.body_channels, 4, 4)
    cam = grad_cam_grid(model, f, torch.tensor([0, 2]))
    assert cam.shape == (2, 4, 4) and (cam >= 0).all()
    # by hand: the target logit of the model output (the mean of the heads) differentiated by H (F alone)
    head = model.head
    f1 = f[:1].clone().requires_grad_(True)
    layer = f1 if head.attn is None else head.attn(f1)
    logits = head.fe(f1) if head.attn is None else (head.ssa(layer) + head.fe(f1)) / 2
    grad, = torch.autograd.grad(logits[0, 0], layer)
    expected = torch.relu((grad.mean((2, 3), keepdim=True) * layer).sum(1))
    torch.testing.assert_close(cam[:1], expected.detach())
    result = batch_localization(model, f, torch.tensor([0, 1]), box_mask([(0, 0, 8, 8)], (32, 32), (4, 4)).repeat(2, 1))
    assert set(result) == ({'box_share', 'pointing_cam'} | ({'in_box_mass', 'pointing_attention'}
                                                            if aggregation == 'plus' else set()))


def test_report_over_a_dataset_of_body_maps():
    model = small_model()
    data = [(torch.rand(model.body_channels, 4, 4), i % 3) for i in range(5)]
    boxes = {i: ImageBoxes([(0, 0, 16, 16)], (32, 32)) for i in (0, 2, 4)}
    report = localization_report(model, data, boxes, body_maps=True, batch_size=2)
    assert report['images'] == 3 and report['box_share'] == pytest.approx(0.25)
    assert 0 <= report['in_box_mass'] <= 1 and report['pointing_cam'] in (0, 1 / 3, 2 / 3, 1)
    empty = localization_report(small_model('no_attention'), data, {}, body_maps=True)
    assert empty['images'] == 0 and empty['in_box_mass'] is None


class Files:
    """A dataset of image files as ``read_boxes`` matches them."""

    def __init__(self, paths):
        self.samples = [(str(p), 0) for p in paths]


def test_read_boxes_of_cub_and_of_a_csv(tmp_path):
    base = make_cub(tmp_path)
    images = sorted((base / 'images').rglob('*.jpg'))
    boxes = read_boxes(str(base / 'bounding_boxes.txt'), Files(images))
    assert len(boxes) == len(images) and boxes[0] == ImageBoxes([(2.0, 3.0, 20.0, 15.0)], (40, 30))
    csv = tmp_path / 'boxes.csv'
    rel = images[1].relative_to(tmp_path)
    csv.write_text(f'path,x,y,w,h\n{rel},1,2,3,4\n{rel},5,6,7,8\n')
    boxes = read_boxes(str(csv), Files(images))
    assert list(boxes) == [1] and boxes[1].boxes == [(1, 2, 3, 4), (5, 6, 7, 8)]


@pytest.mark.parametrize('content,message', [
    ('path,x,y,w,h\nnope.jpg,1,2,3,4\n', 'none of its 1 images'),
    ('a.jpg,1,2,3\n', 'expected path,x,y,w,h'),
    ('a.jpg,1,2,x,4\n', 'expected the numbers'),
    ('a.jpg,1,2,0,4\n', 'positive width'),
    ('1 2 3 4 5\n', 'needs images.txt beside it'),
])
def test_bad_boxes_files_are_one_line(tmp_path, content, message):
    (tmp_path / 'a.jpg').write_bytes(b'')
    path = tmp_path / 'boxes.txt'
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_boxes(str(path), Files([tmp_path / 'a.jpg']))
    with pytest.raises(UserError, match='no such file'):
        read_boxes(str(tmp_path / 'missing.csv'), Files([]))


def test_evaluate_boxes_on_cub_prints_the_localisation(tmp_path, capsys):
    root = tmp_path / 'cub'
    base = make_cub(root, per_class=3)
    run = tmp_path / 'run'
    tiny = ['--model', 'ssanet_test_resnet_plus', '--img-size', '32', '--body-feature-index', '2', '--batch-size',
            '2', '--workers', '0', '--no-pretrained', '--opt', 'adamw']
    assert run_main('train', *tiny, '--dataset', 'cub', '--data-dir', str(root), '--epochs', '1',
                    '--output-dir', str(run)) == 0
    capsys.readouterr()
    assert run_main('evaluate', '--model', str(run / 'best'), '--dataset', 'cub', '--data-dir', str(root),
                    '--boxes', str(base / 'bounding_boxes.txt'), '--workers', '0') == 0
    printed = capsys.readouterr().out
    assert 'localisation (2 images with boxes): attention in the box' in printed
    # the CUB box (2, 3, 20, 15) of a 40 x 30 image covers the top-left 3 x 3 cells of the 4 x 4 map
    assert f'(uniform attention: {9 / 16:.3f})' in printed
    assert 'pointing game: Grad-CAM' in printed and 'most attended position' in printed
    assert run_main('evaluate', '--model', str(run / 'best'), '--dataset', 'cub', '--data-dir', str(root),
                    '--boxes', str(base / 'bounding_boxes.txt'), '--crop-bbox', '--workers', '0') == 2
    assert 'cannot be used with --crop-bbox' in capsys.readouterr().err
