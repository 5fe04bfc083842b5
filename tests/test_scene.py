"""The built-in scene task (``--builtin-task scene``): its boxes hold its parts, it is reproducible by
seed, its families share no glyph, the glyph task is unchanged, and train.py trains on it with the
localisation metrics in the epoch line and metrics.jsonl."""
import hashlib
import json

import numpy as np
import pytest

from recipe_runs import TINY_TRAIN, run_main
from ssa_timm.data import BuiltinFineGrained, BuiltinScene, build_dataset
from ssa_timm.data.builtin import _FRAME, _GLYPH, write_image_folder


def glyph_in_box(img: np.ndarray, box, cell: int) -> np.ndarray:
    """The 4x4 pattern of glyph-coloured cells inside a part's box (the frame and one plate pixel inset)."""
    x, y, w, h = box
    inner = img[y + _FRAME + 1:y + h - _FRAME - 1, x + _FRAME + 1:x + w - _FRAME - 1].astype(float)
    cells = inner.reshape(_GLYPH, cell, _GLYPH, cell, 3).mean(axis=(1, 3))
    return cells.min(-1) >= 200  # the glyph colour has every channel in [200, 256)


def test_each_box_holds_its_part_and_its_frame():
    scene = BuiltinScene('val', samples_per_class=3, seed=1)
    for index in range(len(scene)):
        img, label = scene.render(index)
        (box,) = scene.part_boxes(index)
        cell = next(c for _, _, _, c, framed in scene.layout(index) if framed)
        x, y, w, h = box
        assert 0 <= x and x + w <= scene.image_size and 0 <= y and y + h <= scene.image_size
        np.testing.assert_array_equal(glyph_in_box(img, box, cell), scene.class_glyphs[label])
        frame = img[y:y + h, x:x + w].reshape(-1, 3)
        ring = np.ones((h, w), bool)
        ring[_FRAME:-_FRAME, _FRAME:-_FRAME] = False
        assert len(np.unique(frame[ring.flatten()], axis=0)) == 1  # one frame colour all round


@pytest.mark.parametrize('image_size', [48, 64, 96])
def test_distractors_are_other_classes_and_no_parts_overlap(image_size):
    scene = BuiltinScene('train', samples_per_class=30, seed=0, image_size=image_size)
    for index in range(len(scene)):
        parts = scene.layout(index)
        assert parts[0][0] == scene.targets[index] and parts[0][4] == 1
        assert all(glyph != scene.targets[index] and not framed for glyph, *_, framed in parts[1:])
        squares = [(top, left, _GLYPH * cell + 2 * (_FRAME + 1)) for _, top, left, cell, _ in parts]
        for i, (t1, l1, s1) in enumerate(squares):
            for t2, l2, s2 in squares[i + 1:]:
                assert t1 + s1 <= t2 or t2 + s2 <= t1 or l1 + s1 <= l2 or l2 + s2 <= l1


def test_one_seed_reproduces_two_seeds_differ():
    a, b = BuiltinScene('train', samples_per_class=5, seed=3), BuiltinScene('train', samples_per_class=5, seed=3)
    other = BuiltinScene('train', samples_per_class=5, seed=4)
    for index in range(len(a)):
        np.testing.assert_array_equal(a.render(index)[0], b.render(index)[0])
        assert a.part_boxes(index) == b.part_boxes(index)
    moved = sum(a.part_boxes(i) != other.part_boxes(i) for i in range(len(a)))
    assert moved >= len(a) - 2
    val = BuiltinScene('val', samples_per_class=5, seed=3)
    assert sum(a.part_boxes(i) != val.part_boxes(i) for i in range(len(a))) >= len(a) - 2


def test_families_share_no_glyph():
    glyphs = [BuiltinScene(family=f, seed=0).class_glyphs for f in (0, 1, 2)]
    for i, g in enumerate(glyphs):
        for h in glyphs[i + 1:]:
            assert not any((x == y).all() for x in g for y in h)


def test_build_dataset_picks_the_task_and_the_glyph_task_is_unchanged():
    assert isinstance(build_dataset('builtin', 'val', samples_per_class=2, task='scene'), BuiltinScene)
    glyph = build_dataset('builtin', 'val', samples_per_class=2)
    assert type(glyph) is BuiltinFineGrained
    # the glyph task of 0.5.0, byte for byte (first three validation images of seed 0)
    digest = hashlib.sha256(b''.join(glyph.render(i)[0].tobytes() for i in range(3))).hexdigest()
    assert digest == GLYPH_DIGEST


GLYPH_DIGEST = '36d7bb3cdf4363a2e7df42a905c738a45533e5eee9ba408b07ee60f088bc617b'


def test_small_parts_hold_their_glyph_at_the_chosen_cell():
    scene = BuiltinScene('val', samples_per_class=3, seed=2, part_cell=1)
    for index in range(len(scene)):
        img, label = scene.render(index)
        (box,) = scene.part_boxes(index)
        assert box[2:] == (10, 10) and all(cell == 1 for *_, cell, _ in scene.layout(index))
        np.testing.assert_array_equal(glyph_in_box(img, box, 1), scene.class_glyphs[label])


def test_the_oracle_crop_is_the_zoom_crop_of_the_widened_part_box():
    import torch
    from ssa_timm.zoom import box_iou, zoom_crop
    full = BuiltinScene('val', samples_per_class=2, seed=3, part_cell=1)
    oracle = BuiltinScene('val', samples_per_class=2, seed=3, part_cell=1, oracle_crop=True)
    for index in range(len(full)):
        img, label = full.render(index)
        (x, y, w, h), = full.part_boxes(index)
        box = oracle.oracle_box(index)
        part = torch.tensor([x, y, x + w, y + h]) / 64
        centre = (part[:2] + part[2:]) / 2
        shifted = (box[:2] == 0).any() or (box[2:] == 1).any()  # kept inside the canvas
        assert torch.allclose((box[:2] + box[2:]) / 2, centre, atol=1e-6) or shifted
        assert (box[2:] - box[:2]).min() >= 0.25 - 1e-6 and box_iou(box[None], part[None]) > 0.3
        crop = zoom_crop(torch.from_numpy(img).permute(2, 0, 1)[None].float(), box[None], (64, 64))
        shown, same_label = oracle.render(index)
        assert same_label == label
        np.testing.assert_array_equal(shown, crop[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy())
        # the part's box in the crop's pixels, mapped back, is the part's box in the canvas
        (cx, cy, cw, ch), = oracle.part_boxes(index)
        scale = (box[2:] - box[:2]) * 64 / 64
        back = (torch.tensor([cx, cy]) * scale + box[:2] * 64).tolist()
        assert back == pytest.approx([x, y], abs=1e-4) and cw * scale[0].item() == pytest.approx(w, abs=1e-4)
    assert (oracle.render(0)[0] != full.render(0)[0]).any()


def test_part_cell_and_oracle_crop_are_scene_settings_and_key_the_cache():
    from ssa_timm.data import DatasetLayoutError
    from ssa_timm.train import RunConfig
    with pytest.raises(DatasetLayoutError, match='pass --builtin-task scene'):
        build_dataset('builtin', 'train', samples_per_class=1, part_cell=1)
    with pytest.raises(DatasetLayoutError, match=r'part_cell must be in \[1, 4\]'):
        build_dataset('builtin', 'train', samples_per_class=1, task='scene', part_cell=5)
    scene = dict(model='ssanet_resnet18_plus', builtin_task='scene')
    keys = [RunConfig(**scene, **extra).feature_cache_key('train')
            for extra in ({}, dict(builtin_part_cell=1), dict(builtin_oracle_crop=True))]
    assert keys[0] != keys[1] != keys[2] != keys[0] and 'builtin_part_cell' not in keys[0]


def test_bad_scene_arguments_are_refused():
    with pytest.raises(ValueError, match='image_size'):
        BuiltinScene(image_size=32)
    with pytest.raises(ValueError, match='num_classes'):
        BuiltinScene(num_classes=1)
    with pytest.raises(IndexError):
        BuiltinScene(samples_per_class=1).part_boxes(10)


def test_train_on_the_scene_reports_localisation_and_evaluate_reads_its_boxes_file(tmp_path, capsys):
    out = tmp_path / 'run'
    assert run_main('train', *TINY_TRAIN, '--img-size', '48', '--builtin-task', 'scene', '--epochs', '1',
                    '--builtin-train-per-class', '2', '--builtin-val-per-class', '2', '--batch-size', '4',
                    '--output-dir', str(out)) == 0
    printed = capsys.readouterr().out
    assert 'localisation: in-box attention' in printed and 'pointing Grad-CAM' in printed
    (line,) = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
    where = line['val']['localization']
    assert where['images'] == 20 and 0 < where['box_share'] < 1
    assert 0 <= where['in_box_mass'] <= 1 and where['pointing_cam'] in [k / 20 for k in range(21)]
    # the split as an image folder with its boxes file: evaluate.py --boxes gives what the dataset's own boxes give
    boxes = write_image_folder(BuiltinScene('val', samples_per_class=2), tmp_path / 'folder')
    assert boxes.read_text().splitlines()[0] == 'path,x,y,w,h' and len(boxes.read_text().splitlines()) == 21
    reports = []
    for data in (['--dataset', 'builtin', '--builtin-task', 'scene', '--builtin-val-per-class', '2'],
                 ['--dataset', 'imagefolder', '--data-dir', str(tmp_path / 'folder'), '--boxes', str(boxes)]):
        output = tmp_path / f'report_{len(reports)}.json'
        assert run_main('evaluate', '--model', str(out / 'best'), *data, '--workers', '0', '--output',
                        str(output)) == 0
        assert 'localisation (20 images with boxes)' in capsys.readouterr().out
        reports.append(json.loads(output.read_text())['localization'])
    assert reports[0] == pytest.approx(reports[1])
    # without --builtin-task scene the glyph task's classes do not match: the error names the flag
    assert run_main('evaluate', '--model', str(out / 'best'), '--builtin-val-per-class', '2', '--workers', '0') == 1
    assert 'pass --builtin-task scene' in capsys.readouterr().err
