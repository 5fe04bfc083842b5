"""Evaluate an SSANet: top-1/top-5 of the SSA head, the FE head and their mean, per-class accuracy
and the confusion matrix, written as JSON. Runs on one or many processes (``gather_for_metrics``).

    python recipes/evaluate.py --model runs/builtin/best
    accelerate launch recipes/evaluate.py --model hf-hub:someone/ssanet_vgg16_plus.cub_448 \\
        --dataset cub --data-dir /data/CUB_200_2011 --output cub_eval.json
"""
import argparse
import json
from pathlib import Path
from typing import Dict

from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ssa_timm.data import DATASETS, Transformed, build_dataset, model_transform
from ssa_timm.hub import label_names, load_model
from ssa_timm.metrics import evaluate_heads


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='export folder, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('--dataset', default='builtin', choices=DATASETS)
    p.add_argument('--data-dir', default=None)
    p.add_argument('--crop-bbox', action='store_true')
    p.add_argument('--builtin-val-per-class', type=int, default=50)
    p.add_argument('--seed', type=int, default=0, help='builtin: dataset seed')
    p.add_argument('--img-size', type=int, default=None, help="default: the model's input size")
    p.add_argument('--batch-size', type=int, default=32, help='per process')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--mixed-precision', choices=('no', 'fp16', 'bf16'), default=None)
    p.add_argument('--output', default=None, help='JSON report (default: print only)')
    p.add_argument('--cpu', action='store_true')
    return p.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    model = load_model(args.model)
    images = build_dataset(args.dataset, 'val', args.data_dir, args.crop_bbox, seed=args.seed,
                           samples_per_class=args.builtin_val_per_class)
    if model.num_classes != len(images.classes):
        raise ValueError(f'{args.model} predicts {model.num_classes} classes, the {args.dataset} '
                         f'validation set has {len(images.classes)}')
    names = label_names(model)
    if names is not None and list(names) != list(images.classes):
        accelerator.print(f'warning: the model was trained with other class names than {args.dataset} has')

    transform, img_size = model_transform(model, args.img_size)
    loader = DataLoader(Transformed(images, transform), batch_size=args.batch_size, num_workers=args.workers)
    model, loader = accelerator.prepare(model, loader)
    net = accelerator.unwrap_model(model).eval()

    batches = tqdm(loader, disable=not accelerator.is_local_main_process)
    report = evaluate_heads(net.forward_heads, batches, accelerator, per_class=True)
    report.update(model=args.model, dataset=args.dataset, img_size=img_size, classes=list(images.classes))
    accelerator.print(f'{args.model} on {args.dataset} ({report["count"]} images): ' + ', '.join(
        f'{k} top-1 {v["top1"]:.2f}% top-5 {v["top5"]:.2f}%' for k, v in report.items()
        if isinstance(v, dict) and 'top1' in v))
    if args.output and accelerator.is_main_process:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tears the process group down before exit
    return report


if __name__ == '__main__':
    main()
