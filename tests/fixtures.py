"""Test helpers: running the recipes in subprocesses, and tiny on-disk fixtures in the real layouts
of CUB-200-2011, Stanford Dogs, Stanford Cars and ImageFolder."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# A train.py configuration that runs in seconds: timm's test_resnet body at 32 px read after its layer2
# (stride 8), so the attention works on a 4 x 4 map (16 positions); 80 + 50 images.
TINY_TRAIN = ['--model', 'ssanet_test_resnet_plus', '--img-size', '32', '--body-feature-index', '2',
              '--builtin-train-per-class', '8', '--builtin-val-per-class', '5', '--batch-size', '8', '--workers', '0']
TINY_POSITIONS = 16
# The session's shared trained run (conftest.trained_run): two epochs, cosine attention (--qk-norm), so
# the exports it feeds check that option too.
TRAINED_RUN = [*TINY_TRAIN, '--epochs', '2', '--qk-norm']
TWO_CPU_PROCESSES = (sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                     '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                     '--main_process_port', '0')


def run_python(*args: str, env=None, check: bool = True, launcher=(sys.executable,)) -> subprocess.CompletedProcess:
    """Run ``launcher *args`` from the repository root in a fresh process; fail with its output."""
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **(env or {})))
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def run_recipe(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``recipes/<script>`` with ``args`` (see ``run_python``)."""
    return run_python(str(ROOT / 'recipes' / script), *args, **kwargs)


def recipe(name: str) -> ModuleType:
    """``recipes/<name>.py`` imported as a module (once per process), for in-process calls of its ``main(argv)``."""
    module_name = f'recipe_{name}'
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / 'recipes' / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def run_main(name: str, *argv: str) -> int:
    """Call ``recipes/<name>.py``'s ``main(argv)`` in this process as its ``__main__`` does: 0, argparse's
    exit status (2), or 1 for a user error, whose ``error: ...`` line goes to stderr (read it with capsys)."""
    from ssa_timm.errors import exit_on_user_error
    module = recipe(name)
    try:
        exit_on_user_error(lambda: module.main(list(argv)))
    except SystemExit as e:
        return e.code
    return 0


def write_image(path: Path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_cub(root: Path, classes=('001.Black_footed_Albatross', '002.Laysan_Albatross'), per_class=3) -> Path:
    base = root / 'CUB_200_2011'
    images, labels, split, boxes = [], [], [], []
    n = 0
    for c, name in enumerate(classes, 1):
        for k in range(per_class):
            n += 1
            rel = f'{name}/{name.split(".")[1]}_{k}.jpg'
            write_image(base / 'images' / rel, n)
            images.append(f'{n} {rel}')
            labels.append(f'{n} {c}')
            split.append(f'{n} {1 if k < per_class - 1 else 0}')
            boxes.append(f'{n} 2.0 3.0 20.0 15.0')
    (base / 'images.txt').write_text('\n'.join(images) + '\n')
    (base / 'image_class_labels.txt').write_text('\n'.join(labels) + '\n')
    (base / 'train_test_split.txt').write_text('\n'.join(split) + '\n')
    (base / 'bounding_boxes.txt').write_text('\n'.join(boxes) + '\n')
    (base / 'classes.txt').write_text('\n'.join(f'{i} {c}' for i, c in enumerate(classes, 1)) + '\n')
    return base


def make_dogs(root: Path, breeds=('n02085620-Chihuahua', 'n02085782-Japanese_spaniel'), per_class=3) -> Path:
    from scipy.io import savemat
    lists = {'train': ([], []), 'test': ([], [])}
    n = 0
    for c, breed in enumerate(breeds, 1):
        for k in range(per_class):
            n += 1
            rel = f'{breed}/{breed.split("-")[0]}_{k}.jpg'
            write_image(root / 'Images' / rel, n)
            files, labels = lists['train' if k < per_class - 1 else 'test']
            files.append(rel)
            labels.append(c)
    for split, (files, labels) in lists.items():
        file_list = np.empty((len(files), 1), dtype=object)
        for i, f in enumerate(files):
            file_list[i, 0] = np.array([f])
        savemat(root / f'{split}_list.mat', {'file_list': file_list, 'labels': np.array(labels)[:, None]})
    return root


def make_cars(root: Path, classes=('AM General Hummer SUV 2000', 'Acura RL Sedan 2012'), per_class=3) -> Path:
    from scipy.io import savemat
    base = root / 'stanford_cars'
    annos = {'train': [], 'test': []}
    n = 0
    for c, _ in enumerate(classes, 1):
        for k in range(per_class):
            n += 1
            split = 'train' if k < per_class - 1 else 'test'
            fname = f'{n:05d}.jpg'
            write_image(base / f'cars_{split}' / fname, n)
            annos[split].append((1, 1, 20, 20, c, fname))
    dtype = [('bbox_x1', 'O'), ('bbox_y1', 'O'), ('bbox_x2', 'O'), ('bbox_y2', 'O'), ('class', 'O'), ('fname', 'O')]
    (base / 'devkit').mkdir(parents=True)
    savemat(base / 'devkit' / 'cars_meta.mat', {'class_names': np.array(classes, dtype=object)[None, :]})
    savemat(base / 'devkit' / 'cars_train_annos.mat', {'annotations': np.array([annos['train']], dtype=dtype)})
    savemat(base / 'cars_test_annos_withlabels.mat', {'annotations': np.array([annos['test']], dtype=dtype)})
    return root


def make_image_folder(root: Path, classes=('cat', 'dog'), per_class=2, eval_split='val') -> Path:
    n = 0
    for split in ('train', eval_split):
        for c in classes:
            for k in range(per_class):
                n += 1
                write_image(root / split / c / f'{k}.png', n)
    return root
