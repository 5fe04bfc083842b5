"""Dataset readers on tiny fixtures of every real layout, the built-in dataset, and their errors."""
import numpy as np
import pytest
import torch

from dataset_layouts import make_cars, make_cub, make_dogs, make_image_folder
from ssa_timm.data import (
    BuiltinFineGrained, CorruptImageError, DatasetLayoutError, EpochFlip, Transformed, build_dataset, eval_transform)


def test_cub_official_split_and_bbox(tmp_path):
    make_cub(tmp_path)
    train = build_dataset('cub', 'train', str(tmp_path))
    val = build_dataset('cub', 'val', str(tmp_path / 'CUB_200_2011'))
    assert len(train) == 4 and len(val) == 2
    assert train.classes == ['Black_footed_Albatross', 'Laysan_Albatross']
    assert sorted(train.targets) == [0, 0, 1, 1] and sorted(val.targets) == [0, 1]
    img, label = build_dataset('cub', 'train', str(tmp_path), crop_bbox=True)[0]
    assert img.size == (20, 15) and train[0][0].size == (40, 30)


def test_dogs_mat_lists(tmp_path):
    make_dogs(tmp_path)
    train, val = build_dataset('dogs', 'train', str(tmp_path)), build_dataset('dogs', 'val', str(tmp_path))
    assert (len(train), len(val)) == (4, 2)
    assert train.classes == ['Chihuahua', 'Japanese_spaniel']
    assert train[3][1] == 1 and train[0][0].mode == 'RGB'


def test_cars_devkit_layout(tmp_path):
    make_cars(tmp_path)
    train, val = build_dataset('cars', 'train', str(tmp_path)), build_dataset('cars', 'val', str(tmp_path))
    assert (len(train), len(val)) == (4, 2)
    assert train.classes[1] == 'Acura RL Sedan 2012' and sorted(val.targets) == [0, 1]
    assert isinstance(train[0][1], int)


@pytest.mark.parametrize('eval_split', ['val', 'test'])
def test_image_folder(tmp_path, eval_split):
    make_image_folder(tmp_path, eval_split=eval_split)
    assert len(build_dataset('imagefolder', 'train', str(tmp_path))) == 4
    val = build_dataset('imagefolder', 'val', str(tmp_path))
    assert val.classes == ['cat', 'dog'] and len(val) == 4


@pytest.mark.parametrize('name,match', [
    ('cub', 'images.txt'), ('dogs', 'train_list.mat'), ('cars', 'stanford_cars'), ('imagefolder', 'train/<class>'),
])
def test_missing_layout_names_what_was_expected(tmp_path, name, match):
    with pytest.raises(DatasetLayoutError, match=match):
        build_dataset(name, 'train', str(tmp_path))


def test_cub_split_not_matching_image_list(tmp_path):
    base = make_cub(tmp_path)
    lines = (base / 'train_test_split.txt').read_text().splitlines()
    (base / 'train_test_split.txt').write_text('\n'.join(lines[:-1] + ['99 1']) + '\n')
    with pytest.raises(DatasetLayoutError, match=r'train_test_split.txt does not match images.txt.*\[\'6\', \'99\'\]'):
        build_dataset('cub', 'train', str(tmp_path))


def test_malformed_cub_table(tmp_path):
    base = make_cub(tmp_path)
    (base / 'images.txt').write_text('1\n')
    with pytest.raises(DatasetLayoutError, match=r'images.txt:1: expected 2 fields'):
        build_dataset('cub', 'train', str(tmp_path))


def test_malformed_dogs_mat(tmp_path):
    from scipy.io import savemat
    make_dogs(tmp_path)
    savemat(tmp_path / 'train_list.mat', {'files': np.zeros(3)})
    with pytest.raises(DatasetLayoutError, match=r"lacks \['file_list', 'labels'\]"):
        build_dataset('dogs', 'train', str(tmp_path))
    (tmp_path / 'train_list.mat').write_bytes(b'not a mat file')
    with pytest.raises(DatasetLayoutError, match='cannot read'):
        build_dataset('dogs', 'train', str(tmp_path))


def test_corrupt_image_names_the_file(tmp_path):
    make_image_folder(tmp_path)
    bad = tmp_path / 'train' / 'cat' / '0.png'
    bad.write_bytes(b'\x89PNG garbage')
    ds = build_dataset('imagefolder', 'train', str(tmp_path))
    with pytest.raises(CorruptImageError, match=str(bad)):
        ds[ds.samples.index((str(bad), 0))]


def test_dataset_arguments():
    with pytest.raises(ValueError, match='needs its data folder'):
        build_dataset('cub', 'train')
    with pytest.raises(ValueError, match='dataset must be one of'):
        build_dataset('inat', 'train', '/x')
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        build_dataset('builtin', 'test')


def test_builtin_is_deterministic_and_balanced():
    a, b = BuiltinFineGrained('train', samples_per_class=4), BuiltinFineGrained('train', samples_per_class=4)
    assert len(a) == 40 and np.bincount(a.targets).tolist() == [4] * 10
    assert np.array_equal(a.render(7)[0], b.render(7)[0])
    assert not np.array_equal(a.render(7)[0], BuiltinFineGrained('train', 4, seed=1).render(7)[0])
    assert not np.array_equal(a.render(7)[0], BuiltinFineGrained('val', 4).render(7)[0])
    img, label = a[3]
    assert img.size == (64, 64) and label == 3


def test_builtin_classes_differ_only_in_the_part():
    ds = BuiltinFineGrained('train', samples_per_class=2)
    glyphs = ds.class_glyphs.reshape(len(ds.class_glyphs), -1)
    distances = (glyphs[:, None] != glyphs[None]).sum(-1)
    assert (distances + np.eye(len(glyphs), dtype=int) * 99).min() >= 4
    for index in (0, 1, 13):
        img, label = ds.render(index)
        part = np.all(img == (250, 230, 40), axis=-1)
        assert _contains_glyph(part, ds.class_glyphs[label], cell=64 // 16)
        others = [g for i, g in enumerate(ds.class_glyphs) if i != label]
        assert not any(_contains_glyph(part, g, cell=64 // 16) for g in others)


def _contains_glyph(mask: np.ndarray, glyph: np.ndarray, cell: int) -> bool:
    """Whether the 4x4 glyph, drawn with square cells, sits somewhere in the boolean mask."""
    span = glyph.shape[0] * cell
    for top in range(mask.shape[0] - span + 1):
        for left in range(mask.shape[1] - span + 1):
            if np.array_equal(mask[top:top + span:cell, left:left + span:cell], glyph):
                return True
    return False


def test_epoch_flip_is_reproducible():
    base = Transformed(BuiltinFineGrained('val', samples_per_class=2), eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    flip = EpochFlip(base, seed=3)
    decisions = [flip.schedule.flipped(i) for i in range(20)]
    assert 0 < sum(decisions) < 20
    x, _ = flip[decisions.index(True)]
    torch.testing.assert_close(x, base[decisions.index(True)][0].flip(-1))
    flip.set_epoch(1)
    assert [flip.schedule.flipped(i) for i in range(20)] != decisions
    flip.set_epoch(0)
    assert [flip.schedule.flipped(i) for i in range(20)] == decisions
