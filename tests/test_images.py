"""The one image loader (ssa_timm.data.load_image) on real files of every kind, built here: EXIF
orientation, 16-bit, 32-bit integer and float images, transparency, decompression bombs, truncated
files; and the same loader behind the datasets."""
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from ssa_timm.data import (
    BACKGROUND,
    CorruptImageError,
    ImageTooLargeError,
    LabeledImages,
    build_dataset,
    load_image,
    to_rgb,
)


def exif_rotated_jpeg(path: Path) -> Path:
    """A 60 x 30 JPEG, red left half and blue right half, tagged EXIF orientation 6 (shown rotated
    90 degrees clockwise: 30 x 60, red on top)."""
    a = np.zeros((30, 60, 3), np.uint8)
    a[:, :30] = (255, 0, 0)
    a[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, exif=exif, quality=95)
    return path


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid grey PNG of side x side black pixels (400 M pixels at 20000, ~400 KB on disk), written
    row by row so the test never holds the decoded image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    packer = zlib.compressobj(9)
    row = b'\0' * (side + 1)  # filter byte + pixels
    idat = b''.join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', idat) + chunk(b'IEND', b''))
    return path


def test_exif_orientation_is_applied(tmp_path):
    path = exif_rotated_jpeg(tmp_path / 'phone.jpg')
    with Image.open(path) as raw:
        assert raw.size == (60, 30)  # as stored
    img = load_image(str(path))
    assert img.size == (30, 60) and img.mode == 'RGB'  # as a viewer shows it
    a = np.asarray(img).astype(int)
    top, bottom = a[:25].mean((0, 1)), a[35:].mean((0, 1))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_in_datasets(tmp_path):
    (tmp_path / 'train' / 'cat').mkdir(parents=True)
    exif_rotated_jpeg(tmp_path / 'train' / 'cat' / 'phone.jpg')
    ds = build_dataset('imagefolder', 'train', str(tmp_path))
    img, label = ds[0]
    assert img.size == (30, 60) and label == 0


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(4, 65467, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / 'deep.png')
    with Image.open(tmp_path / 'deep.png') as raw:
        assert raw.mode == 'I;16'
    a = np.asarray(load_image(str(tmp_path / 'deep.png')))
    assert a.shape == (48, 64, 3) and (a[..., 0] == a[..., 2]).all()
    assert np.abs(a[..., 0].astype(int) - np.rint(values / 257)).max() <= 1
    assert (a == 255).mean() < 0.01  # PIL's convert('RGB') makes 99.8 % of these pixels white


@pytest.mark.parametrize('values,expected', [
    (np.arange(1000, 1000 + 7 * 4096, 7, dtype=np.int32).reshape(64, 64), lambda v: v / 257),  # 16-bit data as 'I'
    (np.arange(256, dtype=np.int32).repeat(16).reshape(64, 64), lambda v: v),  # 8-bit data in 'I'
    (np.arange(-2048, 2048, dtype=np.int32).reshape(64, 64), lambda v: (v + 2048) * 255 / 4095),  # no known range
])
def test_32_bit_integer_tiff(tmp_path, values, expected):
    Image.fromarray(values).save(tmp_path / 'int.tif')
    with Image.open(tmp_path / 'int.tif') as raw:
        assert raw.mode == 'I'
    a = np.asarray(load_image(str(tmp_path / 'int.tif')))[..., 0].astype(int)
    assert np.abs(a - np.rint(expected(values.astype(float)))).max() <= 1


@pytest.mark.parametrize('scale', [1.0, 255.0])
def test_float_tiff(tmp_path, scale):
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(values * scale).save(tmp_path / 'float.tif')
    with Image.open(tmp_path / 'float.tif') as raw:
        assert raw.mode == 'F'
    a = np.asarray(load_image(str(tmp_path / 'float.tif')))[..., 1].astype(int)
    assert np.abs(a - np.rint(values * 255)).max() <= 1 and a.max() == 255


def test_transparent_grey_is_composited_over_white(tmp_path):
    la = np.zeros((20, 20, 2), np.uint8)  # black everywhere ...
    la[:, :10, 1] = 255  # ... opaque on the left, transparent on the right
    Image.fromarray(la, 'LA').save(tmp_path / 'la.png')
    with Image.open(tmp_path / 'la.png') as raw:
        assert raw.mode == 'LA'
    a = np.asarray(load_image(str(tmp_path / 'la.png')))
    assert (a[:, :10] == 0).all() and (a[:, 10:] == BACKGROUND).all()


def test_palette_with_transparent_index(tmp_path):
    p = Image.new('P', (16, 16), 1)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * (256 * 3 - 6))  # index 0 black, 1 red
    p.paste(0, (0, 0, 8, 16))  # left half index 0, made transparent below
    p.save(tmp_path / 'p.png', transparency=0)
    with Image.open(tmp_path / 'p.png') as raw:
        assert raw.mode == 'P' and 'transparency' in raw.info
    a = np.asarray(load_image(str(tmp_path / 'p.png')))
    assert (a[:, :8] == BACKGROUND).all() and (a[:, 8:] == (200, 10, 10)).all()


def test_other_modes_become_rgb(tmp_path):
    Image.new('CMYK', (8, 8), (0, 255, 255, 0)).save(tmp_path / 'cmyk.jpg')
    Image.new('1', (8, 8), 1).save(tmp_path / 'bw.png')
    cmyk = np.asarray(load_image(str(tmp_path / 'cmyk.jpg'))).astype(int)
    assert cmyk.shape == (8, 8, 3) and cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60
    assert (np.asarray(load_image(str(tmp_path / 'bw.png'))) == 255).all()
    assert to_rgb(Image.new('RGBA', (4, 4), (9, 9, 9, 0))).getpixel((0, 0)) == BACKGROUND  # in-memory images too


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = png_bomb(tmp_path / 'bomb.png')
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ImageTooLargeError, match=r'bomb\.png: 400,000,000 pixels is over the limit of 89,478,485'):
        load_image(str(bomb))


@pytest.mark.parametrize('side,pixels', [(40, '40 x 40 = 1,600'), (100, '10,000')])  # over the limit; over twice
def test_pixel_limit_follows_pil(tmp_path, monkeypatch, side, pixels):  # the limit, where PIL itself refuses
    Image.new('RGB', (side, side)).save(tmp_path / 'big.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
    with pytest.raises(ImageTooLargeError, match=rf'big\.png: {pixels} pixels is over the limit of 1,000 '):
        load_image(str(tmp_path / 'big.png'))
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)  # PIL's way to lift the limit
    assert load_image(str(tmp_path / 'big.png')).size == (side, side)


def test_truncated_jpeg_names_the_file(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / 'cut.jpg')
    data = (tmp_path / 'cut.jpg').read_bytes()
    (tmp_path / 'cut.jpg').write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptImageError, match=rf'cannot read image {tmp_path / "cut.jpg"}: image file is truncated'):
        load_image(str(tmp_path / 'cut.jpg'))


def test_dataset_names_a_bomb_in_one_line_from_a_loader_worker(tmp_path):
    """A dataset stops at a too large image with one line naming it, also when a DataLoader worker
    read it (torch re-raises the worker's exception with the worker's traceback as its message)."""
    bomb = png_bomb(tmp_path / 'bomb.png')
    ds = LabeledImages([(str(bomb), 0)], ['cat'])
    with pytest.raises(ImageTooLargeError, match='bomb.png'):
        ds[0]
    loader = DataLoader(ds, batch_size=None, num_workers=1, collate_fn=lambda x: x)
    with pytest.raises(ImageTooLargeError) as info:
        next(iter(loader))
    message = str(info.value)
    assert message.startswith(f'cannot read image {bomb}: 400,000,000 pixels is over') and '\n' not in message
    assert 'Traceback' not in message
