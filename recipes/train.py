"""Train SSANet with Self-AD (paper section 4.1) on CPU, one GPU, many GPUs or many machines.

One script for every setup; `accelerate launch` decides where it runs:

    python recipes/train.py                                   # built-in dataset, small body, CPU ok
    accelerate launch recipes/train.py --model ssanet_vgg16_plus --dataset cub --data-dir /data/CUB_200_2011
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 0 recipes/train.py --cpu --epochs 1

Each epoch writes an accelerate checkpoint (``save_state``, rotated) and a JSONL line of metrics;
the best model is exported to ``<output-dir>/best`` in timm's ``save_for_hf`` layout.
"""
import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ssa_timm import SelfADLoss, SSANet
from ssa_timm.data import DATASETS, EpochFlip, Transformed, build_dataset, model_transform
from ssa_timm.feature_cache import CachedFeatures, build_feature_cache
from ssa_timm.hub import export_model, load_model
from ssa_timm.metrics import evaluate_heads

# Defaults of the flags left unset. The paper fine-tunes ImageNet bodies with SGD at 448 px; the
# built-in dataset trains a small body from scratch at its native 64 px, where AdamW is needed.
BUILTIN_DEFAULTS = dict(model='ssanet_resnet18_plus', img_size=64, opt='adamw', weight_decay=0.05)
PAPER_DEFAULTS = dict(model='ssanet_vgg16_plus', img_size=448, opt='sgd', weight_decay=5e-4)


@dataclass
class TrainState:
    """Progress saved with every checkpoint (``register_for_checkpointing``)."""
    model: str = ''
    epoch: int = 0  # epochs fully done
    step_in_epoch: int = 0  # optimizer steps done in the current, unfinished epoch
    global_step: int = 0
    best_top1: float = -1.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class HeadsOnCachedFeatures(torch.nn.Module):
    """The SSA module and heads of an SSANet, fed with cached body maps (the body stays frozen)."""

    def __init__(self, model: SSANet) -> None:
        super().__init__()
        self.model = model

    def forward(self, body_maps: torch.Tensor):
        return self.model.forward_head(self.model.attend(body_maps))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default=None, help='ssanet_<timm body>_<aggregation> (registered or not); '
                   f'default {BUILTIN_DEFAULTS["model"]} on builtin, else {PAPER_DEFAULTS["model"]}')
    p.add_argument('--dataset', default='builtin', choices=DATASETS)
    p.add_argument('--data-dir', default=None)
    p.add_argument('--crop-bbox', action='store_true', help='CUB: crop images to bounding_boxes.txt')
    p.add_argument('--builtin-train-per-class', type=int, default=300, help='builtin: training images per class')
    p.add_argument('--builtin-val-per-class', type=int, default=50, help='builtin: validation images per class')
    p.add_argument('--img-size', type=int, default=None, help='default 64 on builtin, else 448')
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--max-steps', type=int, default=None, help='stop (after a checkpoint) at this optimizer step')
    p.add_argument('--batch-size', type=int, default=32, help='per process')
    p.add_argument('--opt', choices=('sgd', 'adamw'), default=None, help='default: adamw on builtin, else sgd')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--weight-decay', type=float, default=None, help='default: 0.05 on builtin, else 5e-4')
    p.add_argument('--plateau-patience', type=int, default=2)
    p.add_argument('--scale-attn', action='store_true', help='scale the attention logits by 1/sqrt(d) (paper: unscaled)')
    p.add_argument('--qk-norm', action='store_true',
                   help='cosine attention: L2-normalised A and B with a learnable temperature (paper: unscaled dot products)')
    p.add_argument('--loss', choices=('ad', 'ce'), default='ad', help='Self-AD (Eq. 5) or CE on both heads')
    p.add_argument('--gamma', type=float, default=0.5)
    p.add_argument('--temperature', type=float, default=1.0)
    p.add_argument('--label-smoothing', type=float, default=0.0)
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                   help='ImageNet body weights (default: on, except for the built-in dataset)')
    p.add_argument('--freeze-backbone', action='store_true', help='train the SSA module and heads only (the paper)')
    p.add_argument('--cache-features', action='store_true', help='with --freeze-backbone: train from cached body maps')
    p.add_argument('--grad-accum', type=int, default=1)
    p.add_argument('--mixed-precision', choices=('no', 'fp16', 'bf16'), default=None,
                   help='default: what accelerate launch was configured with')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--output-dir', default='runs/builtin')
    p.add_argument('--keep-checkpoints', type=int, default=2)
    p.add_argument('--checkpoint-steps', type=int, default=None, help='also checkpoint every N optimizer steps')
    p.add_argument('--resume', default=None, help="'latest' or a checkpoint folder")
    p.add_argument('--log-with', default=None, help='accelerate tracker: tensorboard, wandb, ...')
    p.add_argument('--cpu', action='store_true', help='run on CPU even when a GPU is present')
    args = p.parse_args(argv)
    defaults = BUILTIN_DEFAULTS if args.dataset == 'builtin' else PAPER_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pretrained is None:
        args.pretrained = args.dataset != 'builtin'
    if args.cache_features and not args.freeze_backbone:
        p.error('--cache-features needs --freeze-backbone (a training body changes its features)')
    if args.qk_norm and args.scale_attn:
        p.error('--qk-norm and --scale-attn exclude each other (qk_norm learns its own logit temperature)')
    return args


def make_loader(dataset, batch_size: int, shuffle: bool, workers: int, drop_last: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                      persistent_workers=False)


def evaluate(model: SSANet, loader, accelerator: Accelerator, from_features: bool) -> Dict:
    """Per-head top-1/top-5 on the validation set (of images, or of cached body maps)."""
    model.eval()
    features = model.attend if from_features else model.forward_features
    return evaluate_heads(lambda inputs: model.head_logits(features(inputs)), loader, accelerator)


def training_function(args: argparse.Namespace) -> Dict:
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        log_with=args.log_with,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), automatic_checkpoint_naming=True, total_limit=args.keep_checkpoints),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    if args.log_with:
        accelerator.init_trackers('ssanet', config={k: v for k, v in vars(args).items() if v is not None})

    train_images = build_dataset(args.dataset, 'train', args.data_dir, args.crop_bbox, seed=args.seed,
                                 samples_per_class=args.builtin_train_per_class)
    val_images = build_dataset(args.dataset, 'val', args.data_dir, args.crop_bbox, seed=args.seed,
                               samples_per_class=args.builtin_val_per_class)
    classes = train_images.classes
    model_kwargs = {k: True for k in ('scale_attn', 'qk_norm') if getattr(args, k)}
    model = load_model(args.model, pretrained=args.pretrained, num_classes=len(classes), **model_kwargs)
    transform, _ = model_transform(model, args.img_size)
    train_flip = EpochFlip(Transformed(train_images, transform), seed=args.seed)
    train_data, val_data = train_flip, Transformed(val_images, transform)

    model.set_distilled_training(True)
    if args.freeze_backbone:
        model.body.requires_grad_(False)
    trainable: torch.nn.Module = model
    if args.cache_features:
        model.to(accelerator.device)
        cache_dir = output_dir / 'feature_cache'
        meta = dict(model=args.model, pretrained=args.pretrained, img_size=args.img_size, dataset=args.dataset,
                    data_dir=args.data_dir, crop_bbox=args.crop_bbox, seed=args.seed,
                    builtin=(args.builtin_train_per_class, args.builtin_val_per_class))
        common = dict(accelerator=accelerator, batch_size=args.batch_size, num_workers=args.workers)
        train_path = build_feature_cache(model, train_data.dataset, cache_dir / 'train.npy', True,
                                         meta=dict(meta, split='train'), **common)
        val_path = build_feature_cache(model, val_data, cache_dir / 'val.npy', False,
                                       meta=dict(meta, split='val'), **common)
        train_data = CachedFeatures(train_path, train_images.targets, flip=train_flip)
        val_data = CachedFeatures(val_path, val_images.targets)
        trainable = HeadsOnCachedFeatures(model)

    per_process = math.ceil(len(train_data) / accelerator.num_processes)
    train_loader = make_loader(train_data, args.batch_size, True, args.workers,
                               drop_last=per_process % args.batch_size == 1)  # BatchNorm1d can't train on one
    val_loader = make_loader(val_data, args.batch_size, False, args.workers)

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in model.no_weight_decay() else decay).append(param)
    groups = [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}]
    if args.opt == 'sgd':
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode='max', factor=0.3, patience=args.plateau_patience)
    trainable, optimizer, train_loader, val_loader = accelerator.prepare(trainable, optimizer, train_loader, val_loader)
    state = TrainState(model=args.model)
    accelerator.register_for_checkpointing(state, scheduler)  # state first: custom_checkpoint_0.pkl
    loss_fn = SelfADLoss(gamma=args.gamma, temperature=args.temperature, mode=args.loss,
                         label_smoothing=args.label_smoothing)

    if args.resume:
        resume_checkpoint(accelerator, args, state)
    print(f'process {accelerator.process_index}/{accelerator.num_processes} on {accelerator.device}: '
          f'{len(train_loader)} training batches per epoch', flush=True)

    metrics_path = output_dir / 'metrics.jsonl'
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    stop = False
    for epoch in range(state.epoch, args.epochs):
        trainable.train()
        if args.freeze_backbone:
            model.body.eval()  # frozen BatchNorm statistics, as in the cached features
        train_data.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        skip = state.step_in_epoch * args.grad_accum
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        loss_sum, loss_count, images, start = torch.zeros((), device=accelerator.device), 0, 0, time.perf_counter()
        for inputs, labels in tqdm(loader, desc=f'epoch {epoch}', disable=not accelerator.is_local_main_process):
            with accelerator.accumulate(trainable):
                loss = loss_fn(trainable(inputs), labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            loss_sum += loss.detach()
            loss_count += 1
            images += len(labels) * accelerator.num_processes
            if accelerator.sync_gradients:
                state.step_in_epoch += 1
                state.global_step += 1
                stop = bool(args.max_steps) and state.global_step >= args.max_steps
                mid_epoch = state.step_in_epoch < steps_per_epoch  # the epoch's end saves anyway
                if mid_epoch and (stop or (args.checkpoint_steps and state.global_step % args.checkpoint_steps == 0)):
                    accelerator.save_state()
                if stop:
                    break
        if stop and state.step_in_epoch < steps_per_epoch:
            break
        epoch_time = time.perf_counter() - start

        report = evaluate(model, val_loader, accelerator, from_features=args.cache_features)
        top1 = report['mean' if 'mean' in report else 'fe']['top1']
        scheduler.step(top1)
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if top1 > state.best_top1:
            state.best_top1 = top1
            if accelerator.is_main_process:
                training = dict(model=args.model, dataset=args.dataset, pretrained=args.pretrained,
                                img_size=args.img_size, epoch=epoch, loss=args.loss, freeze_backbone=args.freeze_backbone)
                export_model(model, str(output_dir / 'best'), classes, args.img_size,
                             extra_config={'metrics': report, 'training': training})
        accelerator.save_state()
        mean_loss = accelerator.reduce(loss_sum, reduction='sum').item() / max(1, loss_count * accelerator.num_processes)
        line = dict(epoch=epoch, step=state.global_step, train_loss=mean_loss, lr=optimizer.param_groups[0]['lr'],
                    images_per_s=images / epoch_time, val=report)
        accelerator.log({'train_loss': mean_loss, 'val_top1': top1, 'lr': line['lr']}, step=epoch)
        if accelerator.is_main_process:
            with metrics_path.open('a') as f:
                f.write(json.dumps(line) + '\n')
        accelerator.print(f'epoch {epoch}: loss {mean_loss:.4f}, val top-1 ' + ', '.join(
            f'{k} {v["top1"]:.1f}%' for k, v in report.items() if isinstance(v, dict)))
        if stop:
            break

    accelerator.wait_for_everyone()
    accelerator.end_training()
    result = dict(best_top1=state.best_top1, epochs_done=state.epoch, global_step=state.global_step,
                  output_dir=str(output_dir))
    if state.best_top1 >= 0:
        accelerator.print(f'best val top-1 (mean of heads): {state.best_top1:.2f}% '
                          f'(chance {100 / len(classes):.1f}%); model exported to {output_dir / "best"}')
    return result


def checkpoint_index(folder: Path) -> int:
    """N of an accelerate ``checkpoint_N`` folder (automatic checkpoint naming)."""
    return int(folder.name.split('_')[-1])


def resume_checkpoint(accelerator: Accelerator, args: argparse.Namespace, state: TrainState) -> None:
    """Load ``--resume`` ('latest' or a folder), refusing a checkpoint of another model."""
    if args.resume == 'latest':
        found = sorted((Path(args.output_dir) / 'checkpoints').glob('checkpoint_*'), key=checkpoint_index)
        if not found:
            raise FileNotFoundError(f'--resume latest: no checkpoint under {Path(args.output_dir) / "checkpoints"}')
        folder = found[-1]
    else:
        folder = Path(args.resume)
        if not folder.is_dir():
            raise FileNotFoundError(f'--resume {args.resume}: not a checkpoint folder')
    saved = TrainState()
    state_file = folder / 'custom_checkpoint_0.pkl'
    if not state_file.is_file():
        raise FileNotFoundError(f'--resume {folder}: not a checkpoint of this recipe (no {state_file.name})')
    saved.load_state_dict(torch.load(state_file, weights_only=False))
    if saved.model != args.model:
        raise ValueError(f'checkpoint {folder} was saved by a run of {saved.model}, this run trains {args.model}')
    try:
        accelerator.load_state(str(folder))
    except RuntimeError as e:
        raise ValueError(f'checkpoint {folder} does not fit {args.model}: {e}') from e
    accelerator.project_configuration.iteration = checkpoint_index(folder) + 1
    accelerator.print(f'resumed from {folder}: epoch {state.epoch}, step {state.global_step}')


def main(argv=None) -> Dict:
    return training_function(parse_args(argv))


if __name__ == '__main__':
    main()
