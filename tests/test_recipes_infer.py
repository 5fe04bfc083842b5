"""predict.py, visualize.py and export.py on a model trained by train.py and on registered names."""
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from fixtures import ROOT, run_recipe
from ssa_timm.data import BuiltinFineGrained


@pytest.fixture
def trained(trained_run) -> Path:
    """The shared run's export (cosine attention, --qk-norm, so the exports check that option too)."""
    return trained_run / 'best'


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('images')
    ds = BuiltinFineGrained('val', samples_per_class=1)
    for i in range(3):
        ds[i][0].save(folder / f'bird_{i}.png')
    (folder / 'sub').mkdir()
    ds[3][0].save(folder / 'sub' / 'bird_3.jpg')
    return folder


def test_predict_files_folders_globs_and_formats(trained, images, tmp_path):
    out = tmp_path / 'p.json'
    run_recipe('predict.py', '--model', str(trained), str(images / 'bird_0.png'), str(images / 'sub'),
           str(images / 'bird_[12].png'), '--top-k', '3', '--batch-size', '2', '--format', 'json', '--output', str(out))
    results = json.loads(out.read_text())
    assert [Path(r['image']).name for r in results] == ['bird_0.png', 'bird_3.jpg', 'bird_1.png', 'bird_2.png']
    for r in results:
        assert len(r['top']) == 3 and r['top'][0]['label'].startswith('glyph_')
        probs = [t['prob'] for t in r['top']]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6

    rows = list(csv.DictReader(io.StringIO(
        run_recipe('predict.py', '--model', str(trained), str(images), '--top-k', '2', '--format', 'csv').stdout)))
    assert len(rows) == 4 * 2 and rows[0]['rank'] == '1' and rows[0]['label'].startswith('glyph_')
    table = run_recipe('predict.py', '--model', str(trained), str(images / 'bird_0.png')).stdout
    assert table.splitlines()[0].endswith('bird_0.png') and '1. glyph_' in table


def test_predict_skips_unreadable_images_and_lists_them(trained, images, tmp_path):
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'\xff\xd8 not a jpeg')
    proc = run_recipe('predict.py', '--model', str(trained), str(bad), str(images / 'bird_0.png'), '--format', 'json')
    assert [Path(r['image']).name for r in json.loads(proc.stdout)] == ['bird_0.png']
    assert f'warning: skipping cannot read image {bad}' in proc.stderr
    assert f'skipped 1 unreadable image(s): {bad}' in proc.stderr
    missing = run_recipe('predict.py', '--model', str(trained), str(tmp_path / 'nope*.png'), check=False)
    assert missing.returncode != 0 and 'no image, folder or glob match' in missing.stderr


def test_predict_registered_name_random_weights(images):
    proc = run_recipe('predict.py', '--model', 'ssanet_vgg16_no_attention', '--img-size', '64', str(images / 'bird_0.png'),
                  '--format', 'json')
    top = json.loads(proc.stdout)[0]['top']
    assert len(top) == 5 and top[0]['label'].isdigit()  # no label names: class indices


def test_visualize_maps_and_fig4_grid(trained, images, tmp_path):
    out = tmp_path / 'vis'
    run_recipe('visualize.py', '--model', str(trained), 'ssanet_vgg16_no_attention', '--img-size', '64',
           '--out-dir', str(out), str(images / 'bird_0.png'), str(images / 'bird_1.png'))
    for stem in ('bird_0', 'bird_1'):
        ssa = np.load(out / f'{stem}_m0.npz')
        assert ssa['gradcam'].shape == (64, 64) and 0 <= ssa['gradcam'].min() and ssa['gradcam'].max() <= 1
        attn = ssa['attention']
        assert attn.shape == (4, 4)  # 2x2 positions of the 64 px test_resnet map
        np.testing.assert_allclose(attn.sum(-1), np.ones(4), atol=1e-5)
        np.testing.assert_allclose(ssa['attention_mean'].ravel(), attn.mean(0), atol=1e-6)
        plain = np.load(out / f'{stem}_m1.npz')
        assert set(plain.files) == {'gradcam'}  # no_attention (registered, random weights): Grad-CAM on F
        assert plain['gradcam'].shape == (64, 64) and 0 <= plain['gradcam'].min() and plain['gradcam'].max() <= 1
        for png in (f'{stem}_m0_gradcam.png', f'{stem}_m0_attention.png', f'{stem}_m1_gradcam.png'):
            with Image.open(out / png) as img:
                assert img.format == 'PNG' and img.width > 200 and img.height > 200
    with Image.open(out / 'grid.png') as grid:
        assert grid.width > grid.height  # 3 columns (input + 2 models) x 2 rows
    assert not (out / 'bird_2_m0.npz').exists()


def test_export_onnx_torchscript_compile(trained, tmp_path):
    run_recipe('export.py', '--model', str(trained), '--onnx', str(tmp_path / 'm.onnx'), '--torchscript',
           str(tmp_path / 'm.pt'), '--compile', '--report', str(tmp_path / 'report.json'))
    report = json.loads((tmp_path / 'report.json').read_text())
    assert json.loads((trained / 'config.json').read_text())['model_args']['qk_norm'] is True  # --qk-norm kept
    assert report['onnx']['max_abs_diff'] <= 1e-4 and report['onnx']['batch_sizes'] == [1, 3]
    assert report['torchscript']['max_abs_diff'] <= 1e-4 and report['compile']['max_abs_diff'] <= 1e-4
    graph = onnx.load(str(tmp_path / 'm.onnx'))
    assert max(o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx')) >= 17
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch axis
    assert (tmp_path / 'm.pt').stat().st_size > 0


def test_export_registered_name_random_weights(tmp_path):
    run_recipe('export.py', '--model', 'ssanet_resnet50_multiply', '--img-size', '64', '--onnx', str(tmp_path / 'r.onnx'),
           '--torchscript', str(tmp_path / 'r.pt'), '--report', str(tmp_path / 'report.json'))
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['onnx']['max_abs_diff'] <= 1e-4 and report['torchscript']['max_abs_diff'] <= 1e-4



def test_benchmark_refuses_bad_model_names_at_parse_time():
    proc = run_recipe('benchmark.py', '--sections', 'train', '--model', 'ssanet_vgg16_plus,', check=False)
    assert proc.returncode == 2 and "--model: expected a name 'ssanet_<timm body>_<aggregation>'" in proc.stderr


@pytest.mark.parametrize('flag,value,message', [('--data-images', '0', 'must be at least 1'),
                                                ('--data-batch', '-3', 'must be at least 1'),
                                                ('--data-workers', '0,,2', 'without empty items'),
                                                ('--data-workers', '1,-1', 'must be at least 0'),
                                                ('--data-workers', 'two', 'expected an integer')])
def test_benchmark_data_flags_checked_at_parse_time(flag, value, message, capsys):
    sys.path.insert(0, str(ROOT / 'recipes'))
    import benchmark
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(['--sections', 'data', flag, value])
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert exit_info.value.code == 2 and f'argument {flag}:' in last_line and message in last_line
