"""Tiny datasets on disk in the real layouts of CUB-200-2011, Stanford Dogs, Stanford Cars and
ImageFolder, and the random images they hold."""
from pathlib import Path

import numpy as np
from PIL import Image


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
