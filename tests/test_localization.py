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
    # a mistyped boxes file is refused before any image is evaluated
    assert run_main('evaluate', '--model', str(run / 'best'), '--dataset', 'cub', '--data-dir', str(root),
                    '--boxes', str(base / 'bounding_boxes.tx'), '--workers', '0') == 1
    printed = capsys.readouterr()
    assert 'bounding_boxes.tx: no such file' in printed.err and 'top-1' not in printed.out
    # a 1 x 1 map cannot tell the box from the rest: a warning, the images left out of the figures
    assert run_main('evaluate', '--model', str(run / 'best'), '--dataset', 'cub', '--data-dir', str(root),
                    '--boxes', str(base / 'bounding_boxes.txt'), '--img-size', '8', '--workers', '0') == 0
    printed = capsys.readouterr().out
    assert 'warning: on the 1 x 1 body map the box covers every cell for 2 image(s)' in printed
    assert 'localisation (' not in printed


def test_box_mask_places_an_off_diagonal_box_on_a_non_square_map_and_image():
    # a 300 x 100 image on a 2 x 6 map: a cell is 50 x 50 pixels; x picks the column, y the row
    mask = box_mask([(200, 0, 50, 50)], (300, 100), (2, 6)).reshape(2, 6)
    assert mask.nonzero().tolist() == [[0, 4]]
    mask = box_mask([(0, 50, 100, 50)], (300, 100), (2, 6)).reshape(2, 6)
    assert mask.nonzero().tolist() == [[1, 0], [1, 1]]


def write_photo(path, exif_orientation=None):
    """A 60 x 40 photo as shown (a bright block at x 40-59, y 0-19); with ``exif_orientation=6`` its pixels are
    stored turned a quarter, as a phone writes a portrait shot, and the tag says how to show them."""
    from PIL import Image
    shown = Image.new('RGB', (60, 40), (20, 20, 20))
    shown.paste((250, 200, 10), (40, 0, 60, 20))
    if exif_orientation is None:
        shown.save(path)
        return
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # what exif_transpose turns back for orientation 6
    exif = Image.Exif()
    exif[0x0112] = exif_orientation
    stored.save(path, exif=exif)


def test_boxes_of_an_exif_rotated_photo_are_read_as_it_is_shown(tmp_path):
    from ssa_timm.data import load_image
    upright, turned = tmp_path / 'upright.png', tmp_path / 'turned.png'
    write_photo(upright)
    write_photo(turned, exif_orientation=6)
    assert load_image(str(turned)).size == (60, 40)
    csv = tmp_path / 'boxes.csv'
    csv.write_text('path,x,y,w,h\nupright.png,40,0,20,20\nturned.png,40,0,20,20\n')
    boxes = read_boxes(str(csv), Files([upright, turned]))
    assert boxes[0] == boxes[1] == ImageBoxes([(40, 0, 20, 20)], (60, 40))
    # the same figures for both copies: the model sees the same pixels, the box the same cells
    model = small_model()
    to_tensor = __import__('torchvision').transforms.functional.to_tensor
    images = [(to_tensor(load_image(str(p)).resize((32, 32))), 0) for p in (upright, turned)]
    first = localization_report(model, images[:1], {0: boxes[0]}, batch_size=1)
    second = localization_report(model, images[1:], {0: boxes[1]}, batch_size=1)
    assert first == second and first['images'] == 1


def test_a_box_outside_its_image_names_the_file_and_line(tmp_path):
    write_photo(tmp_path / 'a.png')
    csv = tmp_path / 'boxes.csv'
    csv.write_text('path,x,y,w,h\na.png,1,1,5,5\na.png,100,10,5,5\n')
    with pytest.raises(UserError, match=r'boxes.csv, line 3: the box x=100 y=10 w=5 h=5 lies outside .*a.png, '
                                        r'which is 60 x 40 pixels as shown'):
        read_boxes(str(csv), Files([tmp_path / 'a.png']))


@pytest.mark.parametrize('header', ['image,x,y,w,h', 'file,x,y,w,h', 'filename,x,y,w,h', 'Path,X,Y,W,H', ''])
def test_csv_headers_and_a_byte_order_mark_are_read(tmp_path, header):
    write_photo(tmp_path / 'a.png')
    csv = tmp_path / 'boxes.csv'
    csv.write_bytes(('\ufeff' + (f'{header}\n' if header else '') + 'a.png,1,2,3,4\n').encode())
    assert read_boxes(str(csv), Files([tmp_path / 'a.png']))[0].boxes == [(1, 2, 3, 4)]


def test_a_cub_boxes_file_with_a_leading_blank_line_is_read_as_cub(tmp_path):
    base = make_cub(tmp_path)
    boxes_txt = base / 'bounding_boxes.txt'
    boxes_txt.write_text('\n' + boxes_txt.read_text())
    images = sorted((base / 'images').rglob('*.jpg'))
    assert read_boxes(str(boxes_txt), Files(images))[0] == ImageBoxes([(2.0, 3.0, 20.0, 15.0)], (40, 30))


def test_a_boxes_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(UserError, match=r'is a folder; expected CUB'):
        read_boxes(str(tmp_path), Files([]))


def test_boxes_over_every_cell_of_the_map_are_left_out_of_the_figures():
    model = small_model()
    data = [(torch.rand(model.body_channels, 1, 1), 0) for _ in range(3)]
    boxes = {i: ImageBoxes([(0, 0, 8, 8)], (32, 32)) for i in range(3)}
    report = localization_report(model, data, boxes, body_maps=True)
    assert report['images'] == 0 and report['whole_map'] == 3 and (report['map_height'], report['map_width']) == (1, 1)
    assert report['in_box_mass'] is None and report['pointing_cam'] is None
    data = [(torch.rand(model.body_channels, 2, 2), 0) for _ in range(3)]
    boxes[2] = ImageBoxes([(0, 0, 32, 32)], (32, 32))
    report = localization_report(model, data, boxes, body_maps=True)
    assert report['images'] == 2 and report['whole_map'] == 1 and report['box_share'] == pytest.approx(0.25)


def test_a_boxes_row_for_a_file_that_is_no_image_is_one_line(tmp_path):
    (tmp_path / 'a.png').write_bytes(b'not an image')
    csv = tmp_path / 'boxes.csv'
    csv.write_text('a.png,1,1,5,5\n')
    with pytest.raises(UserError, match=r'cannot read image .*a.png'):
        read_boxes(str(csv), Files([tmp_path / 'a.png']))
