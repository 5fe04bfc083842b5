"""recipes/demo.py as a user meets it: the Gradio app served on a loopback port, called with
``gradio_client`` (its top-k equal ``predict.py``'s on the same file, its maps those of the library),
unreadable and too large uploads answered in the page, opened in headless Chromium (an upload through
the file input, the label panel and the attention overlays on screen, the screenshot of the docs:
docs/figures/demo.png); ``--model`` errors before any server, and ``--write-space``."""
import json
import os
import re
import runpy
import shutil
import sys
import types
from pathlib import Path

import gradio
import numpy as np
import pytest
import torch
import yaml
from recipe_runs import ROOT, recipe, run_main
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import ssa_timm
from ssa_timm.attention_maps import attention_maps
from ssa_timm.data import BuiltinFineGrained, load_image, model_transform
from ssa_timm.hub import export_model, load_model

pytestmark = pytest.mark.slow

CLASSES = BuiltinFineGrained('val', samples_per_class=1).classes[:3]
SCREENSHOT = ROOT / 'docs' / 'figures' / 'demo.png'
CHROMIUM, CHROMEDRIVER = shutil.which('chromium'), shutil.which('chromedriver')
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--window-size=1280,1000', '--hide-scrollbars', '--force-device-scale-factor=1']


@pytest.fixture(scope='module')
def export(tmp_path_factory) -> Path:
    """A tiny export: timm's test_resnet read after layer1 (stride 4), a 16 x 16 SSA map (256 positions) at 64 px."""
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet_by_name('ssanet_test_resnet_plus', num_classes=3, img_size=64, body_feature_index=1)
    return export_model(model, str(tmp_path_factory.mktemp('demo') / 'best'), CLASSES)


@pytest.fixture(scope='module')
def photo(tmp_path_factory) -> Path:
    """A 96 x 80 PNG whose left half is transparent over hidden noise: the library's loader shows it
    white, a plain ``convert('RGB')`` the noise, so a demo that reads it otherwise than predict.py
    predicts other probabilities."""
    rgb = np.asarray(BuiltinFineGrained('val', samples_per_class=1)[2][0].resize((96, 80)))
    alpha = np.full((80, 96), 255, np.uint8)
    alpha[:, :48] = 0
    noise = np.random.default_rng(0).integers(0, 255, (80, 48, 3), dtype=np.uint8)
    rgba = np.dstack([np.concatenate([noise, rgb[:, 48:]], axis=1), alpha])
    path = tmp_path_factory.mktemp('photo') / 'bird.png'
    Image.fromarray(rgba, 'RGBA').save(path)
    return path


@pytest.fixture(scope='module')
def picture(tmp_path_factory) -> Path:
    """A plain 256 px built-in image, for the browser (and the screenshot of the docs)."""
    path = tmp_path_factory.mktemp('picture') / 'glyphs.png'
    BuiltinFineGrained('val', samples_per_class=1)[5][0].resize((256, 256), Image.NEAREST).save(path)
    return path


def predict_top(export: Path, image: Path, out: Path) -> list:
    """predict.py's top-k (``--format json``) of one image."""
    assert run_main('predict', '--model', str(export), str(image), '--format', 'json', '--output', str(out)) == 0
    return json.loads(out.read_text())[0]['top']


@pytest.fixture(scope='module')
def app(export):
    """The demo launched by its main() on a free loopback port, closed after the module."""
    running = recipe('demo').main(['--model', str(export), '--port', '0', '--examples', '3', '--max-upload-mb', '1'],
                                  block=False)
    assert re.fullmatch(r'http://127\.0\.0\.1:\d+/', running.local_url)
    yield running
    running.close()


def most_attended(export: Path, photo: Path) -> int:
    model = load_model(str(export)).eval()
    transform, _ = model_transform(model)
    x = transform(load_image(str(photo))).unsqueeze(0)
    with torch.no_grad():
        return int(attention_maps(model, model.forward_body(x))['top_query'])


def test_the_client_gets_predict_py_s_top_k_and_the_attention_maps(app, export, photo, tmp_path, monkeypatch,
                                                                     capfd):
    predicted = predict_top(export, photo, tmp_path / 'p.json')
    client = Client(app.local_url, verbose=False)
    labels, chosen, mean, cam = client.predict(handle_file(str(photo)), -1, api_name='/analyze')
    assert [c['label'] for c in labels['confidences']] == [t['label'] for t in predicted] and len(predicted) == 3
    assert [c['confidence'] for c in labels['confidences']] == pytest.approx([t['prob'] for t in predicted], abs=1e-6)
    top = most_attended(export, photo)
    assert chosen['label'] == f'attention of position {top} (row {top // 16}, col {top % 16}), most attended'
    assert cam['label'] == f'Grad-CAM of {predicted[0]["label"]} on H'
    pictures = [np.asarray(Image.open(p)) for p in (chosen['value'], mean, cam['value'])]
    assert all(p.shape == (320, 384, 3) for p in pictures)  # the 96 x 80 image shown at 384 px
    other = 0 if top else 1
    again = client.predict(other, api_name='/requery')
    assert again['label'] == f'attention of position {other} (row 0, col {other}), chosen'
    assert np.abs(np.asarray(Image.open(again['value']), dtype=int) - pictures[0]).max() > 50

    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 64)
    with pytest.raises(AppError, match=r"^cannot read image broken\.png: cannot identify image file 'broken\.png'$"):
        client.predict(handle_file(str(broken)), -1, api_name='/analyze')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 5000)
    too_large = r'^cannot read image bird\.png: 96 x 80 = 7,680 pixels is over the limit of 5,000 '
    with pytest.raises(AppError, match=too_large):
        client.predict(handle_file(str(photo)), -1, api_name='/analyze')
    big = tmp_path / 'big.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(big)
    with pytest.raises(ValueError, match='exceeds the maximum file size of 1048576 bytes'):
        client.predict(handle_file(str(big)), -1, api_name='/analyze')
    assert 'Traceback' not in capfd.readouterr().err


def chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f'--user-data-dir={profile}']:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


LOADED = "const i = document.querySelector(arguments[0] + ' img'); return !!i && i.complete && i.naturalWidth;"


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason='needs Debian chromium and chromium-driver on PATH '
                    '(apt-get install -y chromium chromium-driver; .ci/run installs them)')
def test_an_upload_in_headless_chromium_shows_the_labels_and_the_attention(app, export, picture, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    predicted = predict_top(export, picture, tmp_path / 'p.json')
    browser = chromium(tmp_path / 'profile')
    try:
        browser.get(app.local_url)
        wait = WebDriverWait(browser, 20)
        upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, '#input-image input[type=file]'))
        upload.send_keys(str(picture))
        wait.until(lambda b: all(b.execute_script(LOADED, f'#{i}') == 384 for i in ('attention', 'attention-mean')))
        panel = browser.find_element(By.ID, 'labels').text.splitlines()
        shown = [f'{t["label"]}\n{round(t["prob"] * 100)}%' for t in predicted]
        assert panel[:2] == ['top 3', predicted[0]['label']] and '\n'.join(panel[2:]) == '\n'.join(shown)
        assert 'most attended' in browser.find_element(By.ID, 'attention').text
        height = browser.execute_script('return document.documentElement.scrollHeight')
        browser.execute_cdp_cmd('Emulation.setDeviceMetricsOverride',
                                dict(width=1280, height=height, deviceScaleFactor=1, mobile=False))
        # the docs' screenshot is rewritten only when asked (SSA_TIMM_WRITE_FIGURES=1)
        shot = SCREENSHOT if os.environ.get('SSA_TIMM_WRITE_FIGURES') == '1' else tmp_path / 'demo.png'
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
        box = browser.find_element(By.CSS_SELECTOR, '#attention img').rect
        corner = browser.find_element(By.CSS_SELECTOR, '#input-image img')  # a click picks the position under it
        ActionChains(browser).move_to_element_with_offset(corner, corner.rect['width'] // 2 - 3,
                                                          corner.rect['height'] // 2 - 3).click().perform()
        wait.until(lambda b: 'position 255 (row 15, col 15), chosen' in b.find_element(By.ID, 'attention').text)
        assert browser.find_element(By.CSS_SELECTOR, '#query input[type=number]').get_attribute('value') == '255'
    finally:
        browser.quit()
    with Image.open(SCREENSHOT) as shot:
        assert shot.size == (1280, height) and height > 700
        overlay = np.asarray(shot.convert('RGB').crop((box['x'], box['y'], box['x'] + box['width'],
                                                       box['y'] + box['height'])), dtype=float)
    assert overlay.shape[0] > 150 and overlay.std() > 20  # the overlay is on screen, not a blank panel


def test_a_model_without_attention_gets_grad_cam_on_f_only(picture, tmp_path):
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet_by_name('ssanet_test_resnet_no_attention', num_classes=3, img_size=64,
                                           body_feature_index=1)
    demo = recipe('demo')
    served = demo.load_demo_model(str(export_model(model, str(tmp_path / 'plain'), CLASSES)))
    assert served.shape is None and 'no attention (Grad-CAM on the body map F)' in demo.summary(served)
    labels, chosen, mean, cam, state = demo.analyze(served, {'path': str(picture)}, -1)
    assert chosen is None and mean is None and state is None and len(labels) == 3
    top = max(labels, key=labels.get)
    assert cam.label == f'Grad-CAM of {top} on the body map F' and cam.value is not None


def test_a_model_that_cannot_be_loaded_is_one_line_before_any_server(tmp_path, capfd):
    assert run_main('demo', '--model', str(tmp_path / 'missing'), '--port', '0') == 1
    out, err = capfd.readouterr()
    missing = tmp_path / 'missing'
    assert err.splitlines() == [f"error: '{missing}' is neither an export folder nor a model name: expected a name "
                                "'ssanet_<timm body>_<aggregation>' with aggregation in ('plus', 'multiply', 'alpha', "
                                f"'no_alpha', 'no_attention'), got '{missing}'"]
    assert 'Running on' not in out + err
    assert run_main('demo', '--model', 'hf-hub:nobody/nothing') == 1  # offline (conftest): not in the cache
    err = capfd.readouterr().err
    assert err.splitlines() == ['error: cannot load hf-hub:nobody/nothing: config.json of nobody/nothing is not in '
                                'the Hugging Face cache and HF_HUB_OFFLINE is set']


def test_write_space_makes_a_gradio_space_folder(export, tmp_path, capfd, monkeypatch):
    space = tmp_path / 'space'
    assert run_main('demo', '--model', str(export), '--write-space', str(space), '--top-k', '2') == 0
    assert f'hf upload ORG/NAME {space} --repo-type space' in capfd.readouterr().out
    assert (space / 'demo.py').read_bytes() == (ROOT / 'recipes' / 'demo.py').read_bytes()
    library = Path(ssa_timm.__file__).parent
    assert sorted(p.relative_to(space / 'ssa_timm') for p in (space / 'ssa_timm').rglob('*.py')) == \
        sorted(p.relative_to(library) for p in library.rglob('*.py') if '__pycache__' not in p.parts)
    assert not list(space.rglob('__pycache__'))
    for name in ('config.json', 'model.safetensors'):
        assert (space / 'model' / name).read_bytes() == (export / name).read_bytes()
    front = yaml.safe_load((space / 'README.md').read_text().split('---\n')[1])
    assert front['sdk'] == 'gradio' and front['app_file'] == 'app.py' and front['sdk_version'] == gradio.__version__
    names = [re.match(r'[A-Za-z0-9_.-]+', line).group(0) for line in (space / 'requirements.txt').read_text().split()]
    assert {'torch', 'timm', 'grad-cam', 'safetensors'} <= set(names) and not {'gradio', 'pytest'} & set(names)

    calls = []
    fake = types.ModuleType('demo')
    fake.main = calls.append
    fake.exit_on_user_error = lambda main: main()
    monkeypatch.setitem(sys.modules, 'demo', fake)
    runpy.run_path(str(space / 'app.py'))
    assert calls == [['--model', str(space / 'model'), '--host', '0.0.0.0', '--top-k=2']]
    demo = recipe('demo')
    assert demo.load_demo_model(calls[0][1], top_k=2).names == CLASSES

    assert run_main('demo', '--model', str(export), '--write-space', str(space)) == 1
    assert capfd.readouterr().err.strip() == f'error: --write-space {space} is not empty: give a new or an empty folder'
    assert run_main('demo', '--model', 'ssanet_test_resnet_plus', '--write-space', str(tmp_path / 'other')) == 1
    assert 'needs trained weights' in capfd.readouterr().err


def test_a_zoom_model_shows_predict_py_s_probabilities_and_its_box(picture, tmp_path):
    """The demo of a zoom model: the output of both passes (what predict.py reports) and the zoom box drawn
    on the mean attention it came from."""
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet_by_name('ssanet_test_resnet_plus', num_classes=3, img_size=64,
                                           body_feature_index=1, zoom=True, zoom_min_size=0.5).eval()
    demo = recipe('demo')
    served = demo.load_demo_model(str(export_model(model, str(tmp_path / 'zoom'), CLASSES)))
    labels, _, mean, _, _ = demo.analyze(served, {'path': str(picture)}, -1)
    image = load_image(str(picture))
    x = model_transform(model)[0](image).unsqueeze(0)
    with torch.no_grad():
        logits, boxes = model.forward_with_zoom_box(x)
    probs = logits.softmax(-1)[0]
    assert labels == pytest.approx({CLASSES[c]: float(probs[c]) for c in range(3)}, abs=1e-5)
    plain = attention_maps(model, model.forward_body(x))['attention_mean']
    assert mean.shape[2] == 3 and plain is not None
    x0, y0 = (int(v) for v in (boxes[0, :2] * torch.tensor([mean.shape[1], mean.shape[0]])))
    assert tuple(mean[y0, x0 + 2]) == (255, 220, 0)  # the box's top edge, in the zoom box's colour
