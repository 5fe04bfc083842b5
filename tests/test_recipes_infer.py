"""predict.py, visualize.py, evaluate.py and export.py in-process on a tiny export and on registered
names: formats and streaming, skipped images, outputs that would clobber an input or a model file, full
disks (ENOSPC injected), top-k above the class count; one subprocess run per recipe family (slow tier)."""
import csv
import errno
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from recipe_runs import recipe, run_main, run_recipe
from PIL import Image

import ssa_timm
import ssa_timm.output_paths
from ssa_timm.data import BuiltinFineGrained
from ssa_timm.hub import export_model

CLASSES = BuiltinFineGrained('val', samples_per_class=1).classes  # 10 glyph classes: evaluate.py's builtin set


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory) -> Path:
    """An export of the library's export path: timm's test_resnet body read after layer2 (stride 8: an
    8 x 8 map at 64 px), cosine attention (qk_norm), the built-in set's 10 classes."""
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=10, img_size=64, qk_norm=True,
                                   body_feature_index=2)
    return export_model(model, str(tmp_path_factory.mktemp('tiny') / 'best'), CLASSES)


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('images')
    ds = BuiltinFineGrained('val', samples_per_class=1)
    for i in range(3):
        ds[i][0].save(folder / f'bird_{i}.png')
    (folder / 'sub').mkdir()
    ds[3][0].save(folder / 'sub' / 'bird_3.jpg')
    return folder


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob('.*'))


def test_predict_files_folders_globs_and_formats(tiny, images, tmp_path, capsys):
    out = tmp_path / 'p.json'
    assert run_main('predict', '--model', str(tiny), str(images / 'bird_0.png'), str(images / 'sub'),
                    str(images / 'bird_[12].png'), '--top-k', '3', '--batch-size', '2', '--format', 'json',
                    '--output', str(out)) == 0
    results = json.loads(out.read_text())
    assert [Path(r['image']).name for r in results] == ['bird_0.png', 'bird_3.jpg', 'bird_1.png', 'bird_2.png']
    for r in results:
        assert len(r['top']) == 3 and r['top'][0]['label'] in CLASSES
        probs = [t['prob'] for t in r['top']]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert leftovers(tmp_path) == []

    capsys.readouterr()
    assert run_main('predict', '--model', str(tiny), str(images), '--top-k', '2', '--format', 'csv') == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4 * 2 and rows[0]['rank'] == '1' and rows[0]['label'] in CLASSES
    assert run_main('predict', '--model', str(tiny), str(images), '--format', 'jsonl') == 0
    streamed = {r['image']: r['top'][0] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert streamed == {r['image']: r['top'][0] for r in results}
    assert run_main('predict', '--model', str(tiny), str(images / 'bird_0.png')) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].endswith('bird_0.png') and '1. glyph_' in table


@pytest.mark.parametrize('fmt', ['jsonl', 'csv', 'json'])
def test_predict_streams_and_an_interrupted_run_leaves_whole_records(tiny, images, tmp_path, monkeypatch, capsys,
                                                                     fmt):
    """JSONL and CSV records are on disk as soon as their batch is done, so a Ctrl-C leaves a valid
    partial file; JSON is written once at the end, so an interrupted run writes nothing."""
    predict = recipe('predict')
    out = tmp_path / f'p.{fmt}'
    seen = []
    real = predict.load_image

    def load_then_interrupt(path):
        if len(seen) == 2:
            assert out.exists() == (fmt != 'json')  # the first image's record is already written
            raise KeyboardInterrupt
        seen.append(path)
        return real(path)

    monkeypatch.setattr(predict, 'load_image', load_then_interrupt)
    assert run_main('predict', '--model', str(tiny), str(images), '--batch-size', '1', '--format', fmt,
                    '--output', str(out)) == 130
    err = capsys.readouterr().err
    if fmt == 'json':
        assert not out.exists() and 'interrupted after 2 image(s)' in err
    else:
        assert f'interrupted after 2 image(s); {out} holds their results' in err
        text = out.read_text()
        records = ([json.loads(line) for line in text.splitlines()] if fmt == 'jsonl'
                   else list(csv.DictReader(io.StringIO(text))))
        assert [Path(name).name for name in dict.fromkeys(r['image'] for r in records)] == ['bird_0.png', 'bird_1.png']
    assert leftovers(tmp_path) == []


def test_predict_reads_images_as_a_viewer_shows_them(tiny, tmp_path, capsys):
    """An EXIF-rotated photo is predicted as the upright picture, a 16-bit PNG as its 8-bit rendering."""
    upright = np.asarray(BuiltinFineGrained('val', samples_per_class=1)[5][0].resize((48, 64)))
    Image.fromarray(upright).save(tmp_path / 'upright.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown after a 90 degree clockwise turn
    Image.fromarray(np.rot90(upright).copy()).save(tmp_path / 'phone.png', exif=exif)
    deep = upright[..., 0].astype(np.uint16) * 257
    Image.fromarray(deep).save(tmp_path / 'deep.png')
    Image.fromarray(upright[..., 0]).save(tmp_path / 'grey.png')
    assert run_main('predict', '--model', str(tiny), str(tmp_path), '--format', 'json', '--top-k', '10') == 0
    top = {Path(r['image']).name: r['top'] for r in json.loads(capsys.readouterr().out)}
    assert top['phone.png'] == top['upright.png'] and top['deep.png'] == top['grey.png']
    assert top['phone.png'] != top['grey.png']


def test_predict_skips_unreadable_and_too_large_images(tiny, images, tmp_path, monkeypatch, capsys):
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'\xff\xd8 not a jpeg')
    huge = tmp_path / 'huge.png'
    Image.new('RGB', (120, 120)).save(huge)
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100 * 100)  # huge.png is a bomb under this limit
    assert run_main('predict', '--model', str(tiny), str(bad), str(huge), str(images / 'bird_0.png'),
                    '--format', 'json') == 0
    captured = capsys.readouterr()
    assert [Path(r['image']).name for r in json.loads(captured.out)] == ['bird_0.png']
    assert f'warning: skipping cannot read image {bad}' in captured.err
    assert f'warning: skipping cannot read image {huge}: 120 x 120 = 14,400 pixels is over the limit' in captured.err
    assert f'skipped 2 unreadable image(s): {bad}, {huge}' in captured.err
    assert run_main('predict', '--model', str(tiny), str(tmp_path / 'nope*.png')) == 1
    assert 'no image, folder or glob match' in capsys.readouterr().err


def test_predict_top_k_above_the_class_count_is_clamped_with_a_note(tiny, images, capsys):
    assert run_main('predict', '--model', str(tiny), str(images / 'bird_0.png'), '--top-k', '11',
                    '--format', 'json') == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)[0]['top']) == 10
    assert f'note: --top-k 11 is more than the 10 classes of {tiny}; showing 10' in captured.err


def test_predict_registered_name_random_weights(images, capsys):
    assert run_main('predict', '--model', 'ssanet_vgg16_no_attention', '--img-size', '64',
                    str(images / 'bird_0.png'), '--format', 'json') == 0
    top = json.loads(capsys.readouterr().out)[0]['top']
    assert len(top) == 5 and top[0]['label'].isdigit()  # no label names: class indices


@pytest.mark.parametrize('name,argv', [
    ('evaluate', ['--cpu', '--workers', '0', '--output', '{model}/config.json']),
    ('predict', ['{image}', '--output', '{model}/predictions.jsonl', '--format', 'jsonl']),
    ('predict', ['{image}', '--output', '{image}']),
    ('export', ['--torchscript', '{model}/model.pt']),
    ('visualize', ['{image}', '--output-dir', '{model}']),
])
def test_outputs_never_clobber_inputs_or_model_files(tiny, images, tmp_path, capsys, name, argv):
    import shutil
    model = shutil.copytree(tiny, tmp_path / 'model')
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    image = images / 'bird_0.png'
    argv = [a.format(model=model, image=image) for a in argv]
    assert run_main(name, '--model', str(model), *argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err
    assert (f'is inside the model folder {model}' in err) or (f'--output {image} is also an input' in err)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.mark.parametrize('name,flag,argv', [
    ('predict', '--output', ['{image}', '--format', 'jsonl']),
    ('evaluate', '--output', ['--cpu', '--workers', '0']),
    ('export', '--torchscript', []),
])
def test_a_full_disk_is_found_before_the_model_is_loaded(tiny, images, tmp_path, monkeypatch, capsys, name, flag,
                                                        argv):
    module = recipe(name)
    monkeypatch.setattr(module, 'load_model', lambda *a, **k: pytest.fail('the model was loaded first'))
    monkeypatch.setattr(ssa_timm.output_paths.os, 'fsync', enospc)  # the write probe's byte does not land
    out = tmp_path / 'out' / 'result'
    argv = [a.format(image=images / 'bird_0.png') for a in argv]
    assert run_main(name, '--model', str(tiny), *argv, flag, str(out)) == 1
    assert capsys.readouterr().err.strip() == (f'error: {flag} {out}: cannot write to {out.parent}: '
                                               'No space left on device')
    assert leftovers(tmp_path) == []


def test_predict_full_disk_midway_is_one_line_without_leftovers(tiny, images, tmp_path, monkeypatch, capsys):
    predict = recipe('predict')
    real_open = open

    class FillsUp:
        """A file that takes one record, then reports a full disk."""
        def __init__(self, *args, **kwargs):
            self.file, self.writes = real_open(*args, **kwargs), 0

        def write(self, text):
            self.writes += 1
            if self.writes > 1:
                enospc()
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(predict, 'open', FillsUp, raising=False)
    out = tmp_path / 'p.jsonl'
    assert run_main('predict', '--model', str(tiny), str(images), '--batch-size', '1', '--format', 'jsonl',
                    '--output', str(out)) == 1
    assert capsys.readouterr().err.strip() == f'error: cannot write --output {out}: No space left on device'
    assert not out.exists() and leftovers(tmp_path) == []


def test_evaluate_and_export_full_disk_at_the_end(tiny, tmp_path, monkeypatch, capsys):
    """The disk fills while the report or the model is written: one line naming the output, and the
    partly written temporary file removed."""
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.parent == tmp_path:
            real_write_text(self, '{"partly": ')
            enospc()
        return real_write_text(self, *args, **kwargs)

    def jit_save(module, path):
        Path(path).write_bytes(b'PK partly')
        enospc()

    monkeypatch.setattr(Path, 'write_text', write_text)
    report = tmp_path / 'r.json'
    assert run_main('evaluate', '--model', str(tiny), '--cpu', '--workers', '0', '--builtin-val-per-class', '1',
                    '--output', str(report)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f'error: cannot write --output {report}: No space left on device'
    assert leftovers(tmp_path) == [] and not report.exists()

    with monkeypatch.context() as patch:
        patch.setattr(torch.jit, 'save', jit_save)
        model_pt = tmp_path / 'm.pt'
        assert run_main('export', '--model', str(tiny), '--torchscript', str(model_pt)) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == f'error: cannot write --torchscript {model_pt}: No space left on device'
        assert leftovers(tmp_path) == [] and not model_pt.exists()
    assert run_main('export', '--model', str(tiny), '--torchscript', str(model_pt), '--report', str(report)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f'error: cannot write --report {report}: No space left on device'
    assert leftovers(tmp_path) == [] and not model_pt.exists() and not report.exists()


def test_visualize_maps_and_fig4_grid(tiny, images, tmp_path, capsys):
    out = tmp_path / 'vis'
    assert run_main('visualize', '--model', str(tiny), '--model', 'ssanet_vgg16_no_attention', '--img-size', '64',
                    '--output-dir', str(out), str(images / 'bird_0.png'), str(images / 'bird_1.png')) == 0
    for stem in ('bird_0', 'bird_1'):
        ssa = np.load(out / f'{stem}_m0.npz')
        assert ssa['gradcam'].shape == (64, 64) and 0 <= ssa['gradcam'].min() and ssa['gradcam'].max() <= 1
        attn = ssa['attention']
        assert attn.shape == (64, 64)  # the 8 x 8 map of test_resnet's layer2 at 64 px
        np.testing.assert_allclose(attn.sum(-1), np.ones(64), atol=1e-5)
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


def test_visualize_usage_of_the_docs_and_skipped_images(tiny, images, tmp_path, monkeypatch, capsys):
    """The README's ``visualize.py --model M images/ --output-dir vis/`` works (--model takes one value);
    a model folder given where images go is a one-line error; a too large image is skipped."""
    huge = tmp_path / 'in' / 'huge.png'
    huge.parent.mkdir()
    Image.new('RGB', (120, 120)).save(huge)
    BuiltinFineGrained('val', samples_per_class=1)[0][0].save(tmp_path / 'in' / 'ok.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100 * 100)
    assert run_main('visualize', '--model', str(tiny), str(tmp_path / 'in'), '--output-dir', str(tmp_path / 'vis')) == 0
    assert sorted(p.name for p in (tmp_path / 'vis').iterdir()) == ['ok.npz', 'ok_attention.png', 'ok_gradcam.png']
    assert f'warning: skipping cannot read image {huge}: 120 x 120' in capsys.readouterr().err
    assert run_main('visualize', '--model', str(tiny), str(tiny), str(images),
                    '--output-dir', str(tmp_path / 'v2')) == 1
    assert capsys.readouterr().err.strip() == (f'error: {tiny} is a model folder, given as an image input; '
                                               'give each model its own --model')


def test_export_onnx_torchscript_compile(tiny, tmp_path, capsys):
    assert run_main('export', '--model', str(tiny), '--onnx', str(tmp_path / 'm.onnx'), '--torchscript',
                    str(tmp_path / 'm.pt'), '--compile', '--report', str(tmp_path / 'report.json')) == 0
    report = json.loads((tmp_path / 'report.json').read_text())
    assert json.loads((tiny / 'config.json').read_text())['model_args']['qk_norm'] is True  # cosine attention kept
    assert report['onnx']['max_abs_diff'] <= 1e-4 and report['onnx']['batch_sizes'] == [1, 3]
    assert report['torchscript']['max_abs_diff'] <= 1e-4 and report['compile']['max_abs_diff'] <= 1e-4
    graph = onnx.load(str(tmp_path / 'm.onnx'))
    assert max(o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx')) >= 17
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch axis
    assert (tmp_path / 'm.pt').stat().st_size > 0 and leftovers(tmp_path) == []


def test_export_registered_name_random_weights(tmp_path):
    assert run_main('export', '--model', 'ssanet_resnet50_multiply', '--img-size', '64', '--torchscript',
                    str(tmp_path / 'r.pt'), '--report', str(tmp_path / 'report.json')) == 0
    assert json.loads((tmp_path / 'report.json').read_text())['torchscript']['max_abs_diff'] <= 1e-4


@pytest.mark.slow
def test_recipe_errors_reach_the_terminal_as_one_line(tiny, images, tmp_path):
    """A real process: a config the loader refuses, a full output folder refused, no traceback."""
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'config.json').write_text(json.dumps(dict(json.loads((tiny / 'config.json').read_text()), num_classes=-3)))
    (bad / 'model.safetensors').write_bytes((tiny / 'model.safetensors').read_bytes())
    for script, extra in (('predict.py', [str(images / 'bird_0.png')]), ('evaluate.py', ['--cpu'])):
        proc = run_recipe(script, '--model', str(bad), *extra, check=False)
        assert proc.returncode == 1 and 'Traceback' not in proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f'error: {bad / "config.json"}: num_classes must be an integer >= 1, got -3']


def test_benchmark_refuses_bad_model_names_at_parse_time(capsys):
    assert run_main('benchmark', '--sections', 'train', '--model', 'ssanet_vgg16_plus,') == 2
    assert "--model: expected a name 'ssanet_<timm body>_<aggregation>'" in capsys.readouterr().err


@pytest.mark.parametrize('flag,value,message', [('--data-images', '0', 'must be at least 1'),
                                                ('--data-batch', '-3', 'must be at least 1'),
                                                ('--data-workers', '0,,2', 'without empty items'),
                                                ('--data-workers', '1,-1', 'must be at least 0'),
                                                ('--data-workers', 'two', 'expected an integer')])
def test_benchmark_data_flags_checked_at_parse_time(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe('benchmark').parse_args(['--sections', 'data', flag, value])
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert exit_info.value.code == 2 and f'argument {flag}:' in last_line and message in last_line
