"""Exports in transformers (its TimmWrapper, after ``import ssa_timm``): AutoModelForImageClassification,
AutoImageProcessor and pipeline('image-classification') load what the library's export path writes, with
timm's logits and our label names; Trainer-style training; old exports after fix_config. And timm's own
attention tool (timm.utils.AttentionExtract) on the SSA layer."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from recipe_runs import run_main
from PIL import Image

import ssa_timm
from ssa_timm.data import load_image, model_transform
from ssa_timm.hub import export_model, fix_config, load_model

transformers = pytest.importorskip('transformers')  # the [hf] extra, part of [test]

LABELS = ['ant', 'bee', 'cat', 'dog', 'eel', 'fox', 'gnu']


def tiny_model(**kwargs) -> ssa_timm.SSANet:
    """timm's test_resnet body read after layer2 (an 8 x 8 map at 64 px), 7 classes."""
    torch.manual_seed(0)
    return ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=len(LABELS), img_size=64, body_feature_index=2,
                                  **kwargs)


@pytest.fixture(scope='module')
def export(tmp_path_factory) -> Path:
    return export_model(tiny_model(), str(tmp_path_factory.mktemp('interop') / 'best'), LABELS)


@pytest.fixture(scope='module')
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp('photo') / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(path)
    return path


def timm_logits(spec: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return timm.create_model(spec, pretrained=True).eval()(x)


def test_auto_model_has_timms_logits_and_our_labels(export):
    model = transformers.AutoModelForImageClassification.from_pretrained(str(export)).eval()
    assert type(model).__name__ == 'TimmWrapperForImageClassification'
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.num_labels == len(LABELS)
    x = torch.linspace(-2, 2, 3 * 3 * 64 * 64).reshape(3, 3, 64, 64)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    torch.testing.assert_close(logits, timm_logits(f'local-dir:{export}', x), rtol=0, atol=1e-6)


def test_image_processor_and_pipeline_agree_with_predict(export, photo, capsys):
    processor = transformers.AutoImageProcessor.from_pretrained(str(export))
    transform, _ = model_transform(load_model(str(export)))
    image = Image.open(photo).convert('RGB')
    pixels = processor(image, return_tensors='pt')['pixel_values']
    torch.testing.assert_close(pixels[0], transform(image), rtol=0, atol=1e-6)  # squash, no crop, same norm

    classifier = transformers.pipeline('image-classification', model=str(export))
    hf_top = classifier(str(photo), top_k=3)
    assert run_main('predict', '--model', str(export), str(photo), '--top-k', '3', '--format', 'json') == 0
    ours = json.loads(capsys.readouterr().out)[0]['top']
    assert [t['label'] for t in hf_top] == [t['label'] for t in ours]
    np.testing.assert_allclose([t['score'] for t in hf_top], [t['prob'] for t in ours], atol=1e-6)


@pytest.fixture(scope='module')
def rgba_and_16_bit(tmp_path_factory) -> list[Path]:
    """An RGBA PNG (colours under alpha 0..255) and a 16-bit grey PNG (PIL mode ``I;16``)."""
    folder, rng = tmp_path_factory.mktemp('modes'), np.random.default_rng(1)
    rgba = rng.integers(0, 256, (50, 80, 4), dtype=np.uint8)
    rgba[:, :40, 3] = 0  # the left half transparent: white for load_image, the hidden colours for transformers
    Image.fromarray(rgba, 'RGBA').save(folder / 'rgba.png')
    Image.fromarray(rng.integers(0, 65536, (50, 80), dtype=np.uint16)).save(folder / 'grey16.png')
    return [folder / 'rgba.png', folder / 'grey16.png']


def _predict_py_probs(paths: list[Path], capsys) -> list[dict[str, float]]:
    """Every class's probability from recipes/predict.py, per image, by label."""
    assert run_main('predict', '--model', str(paths[0]), *map(str, paths[1:]), '--top-k', str(len(LABELS)),
                    '--format', 'json') == 0
    return [{t['label']: t['prob'] for t in record['top']} for record in json.loads(capsys.readouterr().out)]


def _pipeline_probs(results: list[list[dict]]) -> list[dict[str, float]]:
    return [{t['label']: t['score'] for t in top} for top in results]


def test_pipeline_on_loader_decoded_images_gives_predicts_probabilities(export, rgba_and_16_bit, capsys):
    """The documented way to get predict.py's numbers through the pipeline: images decoded by load_image."""
    classifier = transformers.pipeline('image-classification', model=str(export))
    ours = _predict_py_probs([export, *rgba_and_16_bit], capsys)
    hf = _pipeline_probs(classifier([load_image(str(p)) for p in rgba_and_16_bit], top_k=len(LABELS)))
    for h, o in zip(hf, ours, strict=True):
        assert list(h) == list(o)  # the same ranking
        np.testing.assert_allclose([h[label] for label in LABELS], [o[label] for label in LABELS], rtol=0,
                                   atol=1e-5)


def test_pipeline_on_raw_paths_drops_alpha_and_clips_16_bits(export, rgba_and_16_bit, capsys):
    """What the docs say transformers' own decoding does with a file path: alpha dropped (the colours
    under it shown, nothing composited), 16-bit values clipped at 255 (not scaled), so its
    probabilities differ from predict.py's on such files."""
    rgba, grey16 = rgba_and_16_bit
    with Image.open(rgba) as img:
        np.testing.assert_array_equal(np.asarray(transformers.image_utils.load_image(str(rgba))),
                                      np.asarray(img)[..., :3])
    with Image.open(grey16) as img:
        assert img.mode == 'I;16'
        clipped = np.minimum(np.asarray(img), 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(transformers.image_utils.load_image(str(grey16))),
                                  np.stack([clipped] * 3, -1))

    classifier = transformers.pipeline('image-classification', model=str(export))
    ours = _predict_py_probs([export, *rgba_and_16_bit], capsys)
    hf = _pipeline_probs(classifier([str(p) for p in rgba_and_16_bit], top_k=len(LABELS)))
    for h, o in zip(hf, ours, strict=True):
        assert max(abs(h[label] - o[label]) for label in LABELS) > 5e-4  # 50 x the tolerance above


def test_train_mode_forward_with_labels_returns_cross_entropy_of_the_mean(export):
    model = transformers.AutoModelForImageClassification.from_pretrained(str(export)).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 6])
    out = model(pixel_values=x, labels=y)
    assert torch.isfinite(out.loss) and out.logits.shape == (4, len(LABELS))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, y))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_trainer_step_trains_the_loaded_model(export, tmp_path):
    model = transformers.AutoModelForImageClassification.from_pretrained(str(export))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    data = [{'pixel_values': torch.randn(3, 64, 64), 'labels': i % len(LABELS)} for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / 'trainer'), max_steps=2, per_device_train_batch_size=4, learning_rate=0.1,
        report_to=[], use_cpu=True, save_strategy='no', logging_steps=1, dataloader_num_workers=0)
    result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert np.isfinite(result.training_loss) and result.global_step == 2
    after = model.state_dict()
    assert not torch.equal(before['timm_model.head.ssa.fc.weight'], after['timm_model.head.ssa.fc.weight'])


def test_old_exports_load_after_fix_config(export, tmp_path):
    old = shutil.copytree(export, tmp_path / 'old')
    config = json.loads((old / 'config.json').read_text())
    config['model_args'].update(num_classes=len(LABELS), in_chans=3)  # as timm 1.0.31's save_for_hf writes it
    (old / 'config.json').write_text(json.dumps(config))
    x = torch.randn(2, 3, 64, 64)
    assert fix_config(old)
    model = transformers.AutoModelForImageClassification.from_pretrained(str(old)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, timm_logits(f'local-dir:{export}', x), rtol=0,
                                   atol=1e-6)


def test_other_channel_counts_load_in_transformers(tmp_path):
    folder = export_model(tiny_model(in_chans=1), str(tmp_path / 'grey'), LABELS)
    model = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, timm_logits(f'local-dir:{folder}', x), rtol=0,
                                   atol=1e-6)


def test_timm_attention_extract_reads_the_ssa_map_on_the_plain_path():
    """timm.utils.AttentionExtract finds ``head.attn.softmax`` when the plain attention path runs
    (``fused_attn=False``, or timm's fused attention switched off) and nothing on the default fused
    eval path; its map is forward_with_attention's S, ``(B, N, N)``."""
    x = torch.randn(2, 3, 64, 64)
    fused = tiny_model().eval()
    with pytest.raises(RuntimeError, match=r'No node names found matching \[\'\*attn.softmax\'\]'):
        timm.utils.AttentionExtract(fused)

    for plain in (tiny_model(fused_attn=False), _built_without_fused_attn()):
        extract = timm.utils.AttentionExtract(plain)
        assert extract.names == ['head.attn.softmax']
        with torch.no_grad():
            maps = extract(x)['head.attn.softmax']
            _, expected = plain.head.attn.forward_with_attention(plain.forward_body(x))
        assert maps.shape == (2, 64, 64)  # (B, N, N) with N = 8 x 8 positions
        torch.testing.assert_close(maps, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, 64))


def _built_without_fused_attn() -> ssa_timm.SSANet:
    """A model built while timm's fused attention is off (what TIMM_FUSED_ATTN=0 does at import)."""
    from timm.layers import config as layer_config
    saved = layer_config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(False)
    try:
        return tiny_model().eval()
    finally:
        layer_config._USE_FUSED_ATTN = saved
