"""An interactive demo of an SSANet in the browser (Gradio): upload an image, or pick one of the built-in
examples, and see the top-k classes, the SSA layer's attention (of the most attended position, or of a
position you choose with the slider or by clicking the image) and the mean attention over all query
positions overlaid on the image, and Grad-CAM of the top class on the SSA-aggregated map H.

    pip install -e '.[demo]'
    python recipes/demo.py --model runs/builtin/best                       # http://127.0.0.1:7860
    python recipes/demo.py --model hf-hub:someone/ssanet_vgg16_plus.cub_448 --host 0.0.0.0 --port 8080
    python recipes/demo.py --model runs/builtin/best --write-space space/  # a Hugging Face Space folder
    hf upload someone/ssanet-demo space/ --repo-type space                 # ... published as a Space

Images are read by the library's one loader and transformed as ``predict.py`` does (the model's
own eval transform), so the top-k shown equal ``predict.py``'s on the same file. An upload that cannot
be read, one over the pixel limit (PIL.Image.MAX_IMAGE_PIXELS, a possible decompression bomb) or over
``--max-upload-mb`` gets a message in the page. The model is loaded once, before the server starts; a
``--model`` that cannot be loaded is one ``error: ...`` line. ``--port 0`` takes a free port.

``--write-space DIR`` writes, instead of serving, a folder ready to be a Hugging Face Space (Gradio SDK):
``app.py`` (runs this demo), ``demo.py`` (this file), ``ssa_timm/`` (a copy of the library),
``requirements.txt`` (its dependencies and Grad-CAM's), ``README.md`` (front matter ``sdk: gradio``)
and, for an export folder, ``model/`` (its ``config.json`` and ``model.safetensors``); an ``hf-hub:``
model is downloaded by the Space when it starts.
"""
import argparse
import atexit
import importlib.metadata
import os
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # no calls home, before gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import ssa_timm  # noqa: E402
from ssa_timm.attention_maps import (attention_maps, draw_box, grad_cam, mark_query, overlay, query_at,  # noqa: E402
                                     query_attention, upsample)
from ssa_timm.cli import HelpFormatter, add_img_size_arg, at_least, torch_device  # noqa: E402
from ssa_timm.data import BuiltinFineGrained, CorruptImageError, load_image, model_transform  # noqa: E402
from ssa_timm.errors import UserError, exit_on_user_error  # noqa: E402
from ssa_timm.hub import check_model_folder, label_names, load_model, model_folder  # noqa: E402
from ssa_timm.output_paths import check_output_path  # noqa: E402

DISPLAY = 384  # longest side of the pictures shown, in pixels
MOST_ATTENDED = -1  # the slider's value for "the most attended position"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--model', required=True, help='export folder, local-dir:PATH, hf-hub:ORG/NAME or a model name')
    p.add_argument('--top-k', type=at_least(1), default=5, help='classes shown (at most the model has)')
    add_img_size_arg(p)
    p.add_argument('--device', type=torch_device, default=None, help='default: cuda when available, else cpu')
    p.add_argument('--host', default='127.0.0.1', help='address to serve on (0.0.0.0: every interface)')
    p.add_argument('--port', type=at_least(0), default=7860, help='port to serve on; 0: a free port')
    p.add_argument('--examples', type=at_least(0), default=4, help='built-in example images offered (0: none)')
    p.add_argument('--max-upload-mb', type=at_least(1), default=20, help='largest upload accepted, in MB')
    p.add_argument('--write-space', metavar='DIR', default=None,
                   help='write a Hugging Face Space folder for --model to DIR instead of serving')
    p.add_argument('--debug', action='store_true', help='show the traceback of user errors')
    return p.parse_args(argv)


@dataclass
class DemoModel:
    """The model the demo serves, loaded once, with what every request needs."""
    spec: str
    model: ssa_timm.SSANet
    names: List[str]
    transform: object
    img_size: int
    top_k: int
    device: str
    shape: Optional[Tuple[int, int]]  # (h, w) of the SSA map; None without attention
    lock: threading.Lock = field(default_factory=threading.Lock)  # Grad-CAM hooks the shared model

    @property
    def positions(self) -> int:
        return self.shape[0] * self.shape[1] if self.shape else 0


def load_demo_model(spec: str, top_k: int = 5, img_size: Optional[int] = None,
                    device: Optional[str] = None) -> DemoModel:
    """Load ``spec`` as ``predict.py`` does (``load_model``, ``model_transform``, ``label_names``).

    Raises:
        UserError: The model cannot be loaded.
    """
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = load_model(spec).to(device).eval()
    names = label_names(model) or [str(i) for i in range(model.num_classes)]
    transform, size = model_transform(model, img_size)
    shape = None
    if model.head.attn is not None:
        with torch.no_grad():
            shape = tuple(model.forward_body(torch.zeros(1, model.in_chans, size, size, device=device)).shape[-2:])
    return DemoModel(spec, model, names, transform, size, min(top_k, model.num_classes), device, shape)


def read_upload(path: Optional[str]) -> Image.Image:
    """The uploaded file through the library's loader; a file it cannot read is a message in the page."""
    if not path:
        raise gr.Error('no image was uploaded', print_exception=False)
    try:
        return load_image(path)
    except CorruptImageError as e:
        raise gr.Error(str(e).replace(str(path), Path(path).name), title='Cannot read the image',
                       print_exception=False) from None


def display_rgb(image: Image.Image, longest: int = DISPLAY) -> np.ndarray:
    """The image as float RGB in [0, 1], scaled so that its longest side is ``longest`` pixels."""
    scale = longest / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32) / 255


def classify(demo: DemoModel, image: Image.Image) -> Tuple[Dict[str, float], torch.Tensor, torch.Tensor, int,
                                                           Optional[List[float]]]:
    """``({label: probability} of the top-k, the input x, the body map F, the top class, the zoom box)``:
    the probabilities of ``predict.py`` (softmax of the logits in float32) and, for a zoom model, its box
    (fractions of the image; None otherwise)."""
    x = demo.transform(image).unsqueeze(0).to(demo.device)
    box = None
    with torch.no_grad():
        body_map = demo.model.forward_body(x)
        if demo.model.zoom:  # the output of both passes, as predict.py gives it
            logits, boxes = demo.model.forward_with_zoom_box(x)
            box = boxes[0].tolist()
        else:
            logits = demo.model.forward_head(demo.model.forward_ssa(body_map))
        probs = logits.float().softmax(-1)[0]
    top = probs.topk(demo.top_k)
    labels = {demo.names[c]: p for p, c in zip(top.values.tolist(), top.indices.tolist())}
    return labels, x, body_map, int(top.indices[0]), box


def query_picture(state: Dict, query: int) -> gr.Image:
    """The attention of ``query`` (``MOST_ATTENDED``: the most attended position) over the image, its
    cell outlined, as an image output whose label names the position."""
    shape, top = state['shape'], state['top_query']
    j = top if query is None or int(query) < 0 else min(int(query), shape[0] * shape[1] - 1)
    rgb = state['rgb']
    heat = upsample(query_attention(state['attention'], j, shape), rgb.shape[:2])
    row, column = divmod(j, shape[1])
    which = 'most attended' if j == top else 'chosen'
    return gr.Image(mark_query(overlay(rgb, heat), j, shape),
                    label=f'attention of position {j} (row {row}, col {column}), {which}')


def analyze(demo: DemoModel, upload: Optional[Dict], query: Optional[float]):
    """The page's outputs for an upload: the top-k, the attention of a position, the mean attention,
    Grad-CAM of the top class on H (on F without attention) and the state of the image.

    ``upload`` is the image input's payload, unprocessed (``preprocess=False``): the uploaded file (its
    ``path`` in Gradio's upload folder) is read by the library's loader, as ``predict.py`` reads it, and
    a file PIL cannot open gets the loader's message instead of Gradio's error."""
    if not upload:
        return None, None, None, None, None
    image = read_upload(upload.get('path'))
    with demo.lock:
        labels, x, body_map, top_class, box = classify(demo, image)
        maps = attention_maps(demo.model, body_map) if demo.shape else None
        cam = grad_cam(demo.model, x, top_class)
    rgb = display_rgb(image)
    where = 'H' if demo.shape else 'the body map F'
    gradcam = gr.Image(overlay(rgb, upsample(cam, rgb.shape[:2])),
                       label=f'Grad-CAM of {demo.names[top_class]} on {where}')
    if maps is None:
        return labels, None, None, gradcam, None
    state = dict(rgb=rgb, attention=maps['attention'], shape=demo.shape, top_query=int(maps['top_query']),
                 size=image.size)
    mean = overlay(rgb, upsample(maps['attention_mean'], rgb.shape[:2]))
    if box is not None:  # the second look: where the zoom cropped, drawn on the attention it came from
        mean = draw_box(mean, box)
    return labels, query_picture(state, query), mean, gradcam, state


def requery(state: Optional[Dict], query: Optional[float]):
    """The attention picture of another position of the image analysed last."""
    return None if state is None else query_picture(state, query)


def clicked(state: Optional[Dict], evt: gr.SelectData):
    """The position under a click on the input image: the slider's new value and its attention."""
    if state is None or evt.index is None:
        return gr.Slider(), gr.Image()  # no change
    query = query_at(evt.index[0], evt.index[1], state['size'], state['shape'])
    return query, query_picture(state, query)


def example_images(count: int) -> List[str]:
    """``count`` built-in validation images (one per class, ``BuiltinFineGrained``) written as PNG files
    into a temporary folder, removed when the process exits."""
    if not count:
        return []
    folder = Path(tempfile.mkdtemp(prefix='ssa_demo_examples_'))
    atexit.register(shutil.rmtree, folder, True)
    ds = BuiltinFineGrained('val', samples_per_class=1)
    paths = []
    for i in range(min(count, len(ds))):
        image, label = ds[i]
        paths.append(str(folder / f'{ds.classes[label]}.png'))
        image.save(paths[-1])
    return paths


def summary(demo: DemoModel) -> str:
    """The page's heading: the model (an SSANet over which body, with which aggregation), its classes,
    input size and SSA map."""
    folder = model_folder(demo.spec)
    source = f'`{folder.name}/`' if folder else f'`{demo.spec}`'
    where = (f'SSA map {demo.shape[0]} x {demo.shape[1]} = {demo.positions} positions' if demo.shape
             else 'no attention (Grad-CAM on the body map F)')
    return (f'## SSANet demo\n{source}: SSANet on `{demo.model.body_name}` ({demo.model.aggregation}), '
            f'{demo.model.num_classes} classes, top {demo.top_k} shown; input {demo.img_size} px; {where}. '
            'Upload an image or pick an example; move the slider or click the image to see what another '
            'position attends.')


def build_app(demo: DemoModel, examples: Sequence[str] = ()) -> gr.Blocks:
    """The demo's page (not launched): ``/analyze`` takes an image file and a position (-1: the most
    attended) and returns the top-k, the attention of that position, the mean attention and Grad-CAM."""
    with gr.Blocks(title='SSANet demo') as app:
        gr.Markdown(summary(demo))
        state = gr.State(None)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type='filepath', image_mode=None, sources=['upload', 'clipboard'], height=300,
                                      label='image (click it to choose a position)', elem_id='input-image')
                query = gr.Slider(MOST_ATTENDED, max(demo.positions - 1, 0), value=MOST_ATTENDED, step=1,
                                  label='query position (-1: the most attended)', visible=bool(demo.shape),
                                  elem_id='query')
                if examples:
                    gr.Examples(examples, inputs=image, label='built-in examples')
            labels = gr.Label(num_top_classes=demo.top_k, label=f'top {demo.top_k}', elem_id='labels')
        with gr.Row():
            chosen = gr.Image(label='SSA attention of a position', format='png', visible=bool(demo.shape),
                              elem_id='attention')
            mean = gr.Image(label='mean SSA attention over all query positions', format='png', visible=bool(demo.shape),
                            elem_id='attention-mean')
            cam = gr.Image(label='Grad-CAM', format='png', elem_id='gradcam')
        image.change(lambda upload, q: analyze(demo, upload, q), [image, query], [labels, chosen, mean, cam, state],
                     api_name='analyze', preprocess=False)
        query.release(requery, [state, query], chosen, api_name='requery')
        image.select(clicked, [state], [query, chosen], api_visibility='private')
    return app


def free_port(host: str) -> int:
    """A port no one listens on now, for ``--port 0``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(args: argparse.Namespace, block: bool = True) -> gr.Blocks:
    """Load the model, then launch the page on ``--host:--port``; with ``block=False`` return the
    running app (``app.local_url``; stop it with ``app.close()``)."""
    demo = load_demo_model(args.model, args.top_k, args.img_size, args.device)
    app = build_app(demo, example_images(args.examples))
    port = args.port or free_port(args.host)
    app.launch(server_name=args.host, server_port=port, max_file_size=f'{args.max_upload_mb}mb',
               prevent_thread_lock=not block, show_error=False, quiet=not block)
    return app


def space_requirements() -> List[str]:
    """The installed library's dependencies and those of its ``vis`` extra (Grad-CAM), from its
    metadata, for ``requirements.txt`` (Gradio comes with the Space's SDK)."""
    lines = []
    for requirement in importlib.metadata.requires('ssa-timm') or []:
        spec, _, marker = requirement.partition(';')
        extra = re.search(r'extra\s*==\s*["\']([^"\']+)', marker)
        if (extra is None and not marker.strip()) or (extra and extra.group(1) == 'vis'):
            lines.append(spec.strip())
    return lines


def space_readme(spec: str, repo: Optional[str]) -> str:
    models = f'models:\n  - {repo}\n' if repo else ''
    return (f'---\ntitle: SSANet demo\nemoji: 🔎\ncolorFrom: blue\ncolorTo: green\nsdk: gradio\n'
            f'sdk_version: {gr.__version__}\napp_file: app.py\npinned: false\n{models}---\n\n'
            f'# SSANet demo\n\nThe interactive demo of `recipes/demo.py` (ssa_timm {ssa_timm.__version__}) for '
            f'`{spec}`: the top classes of an image, the SSA attention and Grad-CAM on H.\n\n'
            '`ssa_timm/` is a copy of the library; `demo.py` is its `recipes/demo.py`.\n')


def space_model(spec: str, out: Path) -> Tuple[str, Optional[str]]:
    """The ``--model`` of the Space's ``app.py`` (a folder relative to it, or the ``hf-hub:`` spec) and
    the Hub repo it names, copying an export folder's files into ``out/model``."""
    if spec.startswith('hf-hub:'):
        load_model(spec)  # fails here, in one line, when it cannot be loaded
        return spec, spec[len('hf-hub:'):].partition('@')[0]
    folder = model_folder(spec)
    if folder is None:
        raise UserError(f'--write-space needs trained weights: give --model an export folder, local-dir:PATH or '
                        f'hf-hub:ORG/NAME, not {spec!r}')
    weights = check_model_folder(folder)
    (out / 'model').mkdir(parents=True)
    shutil.copy2(folder / 'config.json', out / 'model' / 'config.json')
    shutil.copy2(weights, out / 'model' / 'model.safetensors')
    return 'model', None


def write_space(args: argparse.Namespace) -> Path:
    """Write the Hugging Face Space folder of ``--write-space`` (see the module doc); returns it."""
    folder = model_folder(args.model)
    out = check_output_path(args.write_space, '--write-space', model_folders=[folder] if folder else [],
                            is_folder=True)
    if any(out.iterdir()):
        raise UserError(f'--write-space {out} is not empty: give a new or an empty folder')
    model, repo = space_model(args.model, out)
    path_expr = f'str(Path(__file__).parent / {model!r})' if model == 'model' else repr(model)
    options = (('--top-k', args.top_k), ('--img-size', args.img_size))
    flags = ''.join(f', {f"{flag}={value}"!r}' for flag, value in options if value)
    (out / 'app.py').write_text(
        '"""Hugging Face Space: the ssa_timm demo (demo.py is recipes/demo.py)."""\nfrom pathlib import Path\n\n'
        'from demo import exit_on_user_error, main\n\n'
        f"exit_on_user_error(lambda: main(['--model', {path_expr}, '--host', '0.0.0.0'{flags}]))\n")
    shutil.copy2(Path(__file__), out / 'demo.py')
    shutil.copytree(Path(ssa_timm.__file__).parent, out / 'ssa_timm', ignore=shutil.ignore_patterns('__pycache__'))
    (out / 'requirements.txt').write_text('\n'.join(space_requirements()) + '\n')
    (out / 'README.md').write_text(space_readme(f'{folder.name}/' if folder else args.model, repo))
    return out


def main(argv=None, block: bool = True):
    args = parse_args(argv)
    if args.write_space:
        out = write_space(args)
        print(f'wrote a Hugging Face Space to {out}; publish it with: hf upload ORG/NAME {out} --repo-type space')
        return out
    return serve(args, block)


if __name__ == '__main__':
    exit_on_user_error(main)
