"""Train SSANet with Self-AD (paper section 4.1) on CPU, one GPU, many GPUs or many machines.

One script for every setup; `accelerate launch` decides where it runs:

    python recipes/train.py                                   # built-in dataset, small body, CPU ok
    accelerate launch recipes/train.py --model ssanet_vgg16_plus --dataset cub --data-dir /data/CUB_200_2011
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 0 recipes/train.py --cpu --epochs 1

The run owns ``--output-dir``: each epoch writes a checkpoint (``checkpoints/checkpoint_N``, with the
run's identity and progress in ``run_state.json``), a JSONL line of metrics with the attention
diagnostics, and exports the best model to ``best/`` in timm's ``save_for_hf`` layout; checkpoints
and exports are written to a temporary sibling and renamed into place. ``--resume latest`` goes on
from the newest complete checkpoint.
"""
import argparse
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file
from timm.optim import (
    create_optimizer_v2, get_optimizer_class, list_optimizers, param_groups_layer_decay, param_groups_weight_decay)
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ssa_timm import SelfADLoss, SSANet
from ssa_timm.cli import (
    add_timm_dataset_args, at_least, dataset_split, fraction, non_negative_float, positive_float, timm_dataset_options,
    trackers)
from ssa_timm.data import (
    EpochFlip, Transformed, TransformedStream, build_dataset, dataset_name, first_images, model_transform)
from ssa_timm.data.streams import batches_on_every_process, epoch_samples, is_stream
from ssa_timm.diagnostics import probe_attention
from ssa_timm.errors import UserError, exit_on_user_error
from ssa_timm.feature_cache import CachedFeatures, HeadsOnCachedFeatures, build_feature_cache
from ssa_timm.hub import export_model, load_model
from ssa_timm.metrics import evaluate_heads, report_top1
from ssa_timm.run_dir import RunLock, atomic_dir, atomic_write_text, ensure_writable_dir, restore_interrupted, run_files

# Defaults of the flags left unset. The paper fine-tunes ImageNet bodies with SGD at 448 px; the
# built-in dataset trains a small body from scratch at its native 64 px, where AdamW is needed, and
# there a ResNet-18 body is read after layer2 (stride 8), so the attention works on an 8 x 8 map.
BUILTIN_DEFAULTS = dict(model='ssanet_resnet18_plus', img_size=64, opt='adamw', weight_decay=0.05)
PAPER_DEFAULTS = dict(model='ssanet_vgg16_plus', img_size=448, opt='momentum', weight_decay=5e-4)  # SGD, momentum 0.9
BUILTIN_RESNET18_FEATURE_INDEX = 2
STATE_FILE = 'run_state.json'
EMA_FILE = 'ema.safetensors'
REPLACED = '.replaced'  # --overwrite moves the old run here, deleted once the new run has a checkpoint


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint's ``run_state.json``."""
    epoch: int = 0  # epochs fully done
    step_in_epoch: int = 0  # optimizer steps done in the current, unfinished epoch
    global_step: int = 0
    best_top1: float = -1.0
    # sums over the current epoch's steps so far, all processes: the epoch's metrics survive a resume
    loss_sum: float = 0.0
    loss_count: int = 0
    images: int = 0
    seconds: float = 0.0


@dataclass
class Run:
    """Everything a training run holds, passed to the steps of ``training_function``."""
    args: argparse.Namespace
    accelerator: Accelerator
    identity: Dict
    classes: list
    model: SSANet
    trainable: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: SelfADLoss
    train_data: object
    train_loader: DataLoader
    val_loader: DataLoader
    probe_inputs: torch.Tensor  # a fixed validation batch for the attention diagnostics
    ema: Optional[ModelEmaV3] = None
    progress: Progress = field(default_factory=Progress)

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_args(p)
    add_optimization_args(p)
    add_run_args(p)
    add_timm_dataset_args(p)
    args = p.parse_args(argv)
    defaults = BUILTIN_DEFAULTS if args.dataset == 'builtin' else PAPER_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pretrained is None:
        args.pretrained = args.dataset != 'builtin'
    if args.body_feature_index is None and args.dataset == 'builtin' and args.model.startswith('ssanet_resnet18_'):
        args.body_feature_index = BUILTIN_RESNET18_FEATURE_INDEX
    check_args(p, args)
    return args


def add_model_and_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', default=None, help='ssanet_<timm body>_<aggregation> (registered or not); '
                   f'default {BUILTIN_DEFAULTS["model"]} on builtin, else {PAPER_DEFAULTS["model"]}')
    p.add_argument('--body-feature-index', type=int, default=None,
                   help="read the body's map at this feature_info index, pruning later stages "
                        "(default: 2, ResNet-18's layer2, for ResNet-18 on builtin; else the body's last map)")
    p.add_argument('--dataset', default='builtin', type=dataset_name,
                   help='builtin, cub, dogs, cars, imagefolder, or a timm spec: hfds/..., hfids/..., wds/...')
    p.add_argument('--data-dir', default=None)
    p.add_argument('--crop-bbox', action='store_true', help='CUB: crop images to bounding_boxes.txt')
    p.add_argument('--builtin-train-per-class', type=at_least(1), default=300, help='builtin: training images per class')
    p.add_argument('--builtin-val-per-class', type=at_least(1), default=50, help='builtin: validation images per class')
    p.add_argument('--img-size', type=at_least(1), default=None, help='default 64 on builtin, else 448')
    p.add_argument('--scale-attn', action='store_true', help='scale the attention logits by 1/sqrt(d) (paper: unscaled)')
    p.add_argument('--qk-norm', action='store_true',
                   help='cosine attention: L2-normalised A and B with a learnable temperature (paper: unscaled dot products)')
    p.add_argument('--loss', choices=('ad', 'ce'), default='ad', help='Self-AD (Eq. 5) or CE on both heads')
    p.add_argument('--gamma', type=non_negative_float, default=0.5)
    p.add_argument('--temperature', type=positive_float, default=1.0)
    p.add_argument('--label-smoothing', type=fraction, default=0.0)
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                   help='ImageNet body weights (default: on, except for the built-in dataset)')
    p.add_argument('--freeze-backbone', action='store_true', help='train the SSA module and heads only (the paper)')
    p.add_argument('--cache-features', action='store_true', help='with --freeze-backbone: train from cached body maps')


def add_optimization_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--epochs', type=at_least(1), default=6)
    p.add_argument('--max-steps', type=at_least(1), default=None, help='stop (after a checkpoint) at this optimizer step')
    p.add_argument('--batch-size', type=at_least(2), default=32, help='per process (BatchNorm needs 2)')
    p.add_argument('--opt', default=None,
                   help="timm optimizer: momentum (SGD with momentum), sgd (Nesterov SGD), adamw, lamb, ...; "
                        'default: adamw on builtin, else momentum (the paper)')
    p.add_argument('--lr', type=positive_float, default=1e-3, help='learning rate of the SSA module and heads')
    p.add_argument('--body-lr-scale', type=non_negative_float, default=1.0,
                   help="the body's learning rate relative to --lr (fine-grained practice: 0.1)")
    p.add_argument('--layer-decay', type=positive_float, default=None, help="timm layer-wise lr decay over the model's layer groups (the heads last)")
    p.add_argument('--momentum', type=non_negative_float, default=0.9, help='SGD momentum')
    p.add_argument('--weight-decay', type=non_negative_float, default=None, help='default: 0.05 on builtin, else 5e-4')
    p.add_argument('--sched', choices=('plateau', 'cosine', 'step'), default='plateau',
                   help='plateau: lr x0.3 after --plateau-patience epochs without a better val top-1 (paper)')
    p.add_argument('--plateau-patience', type=at_least(0), default=2)
    p.add_argument('--decay-epochs', type=positive_float, default=30, help='step: epochs between decays by --decay-rate')
    p.add_argument('--decay-rate', type=positive_float, default=0.1, help='step: lr factor')
    p.add_argument('--warmup-epochs', type=at_least(0), default=0)
    p.add_argument('--min-lr', type=non_negative_float, default=0.0)
    p.add_argument('--clip-grad', type=positive_float, default=None, help='clip the gradient norm to this value')
    p.add_argument('--model-ema', action='store_true', help="keep timm's ModelEmaV3 of the weights; evaluated each epoch")
    p.add_argument('--model-ema-decay', type=fraction, default=0.998)
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile the training step (eval and export stay eager)')
    p.add_argument('--grad-checkpointing', action='store_true', help="recompute the body's activations in backward")
    p.add_argument('--tta', choices=('none', 'flip'), default='none',
                   help='validation also with logits averaged over each image and its mirror; flip then picks the best epoch')


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--grad-accum', type=at_least(1), default=1)
    p.add_argument('--mixed-precision', choices=('no', 'fp16', 'bf16'), default=None,
                   help='default: what accelerate launch was configured with')
    p.add_argument('--workers', type=at_least(0), default=2)
    p.add_argument('--seed', type=at_least(0), default=0)
    p.add_argument('--output-dir', default='runs/builtin')
    p.add_argument('--overwrite', action='store_true', help='replace the run already in --output-dir')
    p.add_argument('--keep-checkpoints', type=at_least(1), default=2)
    p.add_argument('--checkpoint-steps', type=at_least(1), default=None, help='also checkpoint every N optimizer steps')
    p.add_argument('--resume', default=None, help="'latest' or a checkpoint folder")
    p.add_argument('--log-with', type=trackers, default=None, help='accelerate trackers, comma separated: tensorboard, wandb, ...')
    p.add_argument('--cpu', action='store_true', help='run on CPU even when a GPU is present')
    p.add_argument('--debug', action='store_true', help='show the traceback of user errors')


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse combinations and values that fail later, with argparse's exit status 2."""
    if args.cache_features and not args.freeze_backbone:
        p.error('--cache-features needs --freeze-backbone (a training body changes its features)')
    if args.qk_norm and args.scale_attn:
        p.error('--qk-norm and --scale-attn exclude each other (qk_norm learns its own logit temperature)')
    if args.tta != 'none' and args.cache_features:
        p.error('--tta flip mirrors images; it cannot run on cached body maps (--cache-features)')
    if args.resume and args.overwrite:
        p.error('--resume continues the run in --output-dir, --overwrite replaces it: give one')
    if args.warmup_epochs >= args.epochs:
        p.error(f'--warmup-epochs ({args.warmup_epochs}) must be below --epochs ({args.epochs})')
    if args.opt.lower() not in list_optimizers():
        p.error(f"--opt {args.opt!r} is not one of timm's optimizers: {', '.join(list_optimizers())}")
    try:  # listed optimizers whose package (bitsandbytes, apex, ...) is missing fail here
        get_optimizer_class(args.opt)
    except (AssertionError, ImportError, RuntimeError) as e:
        p.error(f'--opt {args.opt} cannot be used here: {e}')
    if args.opt.lower() in ('sgd', 'nesterov') and args.momentum == 0:
        p.error("--opt sgd is timm's Nesterov SGD, which needs --momentum > 0; --opt momentum is plain SGD")
    try:  # the model name and the input size, on the meta device: nothing is allocated
        if not Path(args.model).is_dir() and not args.model.startswith(('hf-hub:', 'local-dir:')):
            load_model(args.model, device='meta', img_size=args.img_size, **model_kwargs(args))
    except (UserError, ValueError) as e:
        p.error(f'--model {args.model} at --img-size {args.img_size}: {e}')


def model_kwargs(args: argparse.Namespace) -> Dict:
    """SSANet arguments the flags set (and the export's config records)."""
    kwargs = {k: True for k in ('scale_attn', 'qk_norm') if getattr(args, k)}
    if args.body_feature_index is not None:
        kwargs['body_feature_index'] = args.body_feature_index
    return kwargs


def claim_output_dir(args: argparse.Namespace, accelerator: Accelerator) -> RunLock:
    """Own ``--output-dir`` before any data or model is loaded: a folder (writable), not in use by
    another run, and holding no other run unless resuming it or told to overwrite it."""
    out = Path(args.output_dir)
    lock = RunLock(out)

    def claim() -> None:
        ensure_writable_dir(out, '--output-dir')
        lock.acquire()
        try:
            for name in ('best', 'checkpoints'):
                restore_interrupted(out / name)
            found = run_files(out)
            if found and not (args.resume or args.overwrite):
                raise UserError(f'--output-dir {out} already holds a run ({", ".join(found)}); pass --resume latest '
                                'to continue it, --overwrite to replace it, or another --output-dir')
            if args.overwrite:
                set_aside_run(out)
        except BaseException:
            lock.release()
            raise
    on_main_process(accelerator, claim)
    return lock


def set_aside_run(out: Path) -> None:
    """``--overwrite``: move a run's files into ``<out>/.replaced``, deleted when the new run saves its
    first checkpoint, so a new run that fails before that leaves the old one recoverable there (the
    feature cache stays: it is keyed by its inputs)."""
    aside = out / REPLACED
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for name in ('best', 'checkpoints', 'metrics.jsonl'):
        if (out / name).exists():
            (out / name).rename(aside / name)


def build_data(args: argparse.Namespace):
    """Training and validation images; validation labels are indices into the training classes."""
    train = build_dataset(args.dataset, dataset_split(args, True), args.data_dir, args.crop_bbox, seed=args.seed,
                          samples_per_class=args.builtin_train_per_class, **timm_dataset_options(args, True))
    val = build_dataset(args.dataset, dataset_split(args, False), args.data_dir, args.crop_bbox, seed=args.seed,
                        samples_per_class=args.builtin_val_per_class, classes=train.classes,
                        **timm_dataset_options(args, False))
    counts = epoch_samples(train), epoch_samples(val)  # over all processes: every process decides alike
    if 0 in counts:
        raise UserError(f'the {args.dataset} dataset has {counts[0]} training and {counts[1]} validation images')
    if is_stream(train) and args.cache_features:
        raise UserError(f'--cache-features needs a map-style dataset; {args.dataset} is streamed (use hfds/)')
    if is_stream(train) and args.checkpoint_steps:
        raise UserError(f'--checkpoint-steps saves in the middle of an epoch, which a streamed dataset ({args.dataset}) '
                        'cannot resume from; checkpoints are saved at each epoch\'s end')
    return train, val


# training settings a checkpoint's optimizer and scheduler state depend on
TRAINING_SETTINGS = ('opt', 'lr', 'momentum', 'weight_decay', 'body_lr_scale', 'layer_decay', 'sched', 'epochs',
                     'plateau_patience', 'decay_epochs', 'decay_rate', 'warmup_epochs', 'min_lr', 'model_ema',
                     'model_ema_decay', 'loss', 'gamma', 'temperature', 'label_smoothing', 'clip_grad')


def run_identity(args: argparse.Namespace, classes, train_count: int, val_count: int, num_processes: int) -> Dict:
    """What a checkpoint must share with the run that resumes it."""
    return dict(model=args.model, model_args=model_kwargs(args), dataset=args.dataset,
                data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None, crop_bbox=args.crop_bbox,
                classes=list(classes), train_samples=train_count, val_samples=val_count, img_size=args.img_size,
                seed=args.seed, pretrained=args.pretrained, freeze_backbone=args.freeze_backbone,
                cache_features=args.cache_features, batch_size=args.batch_size, grad_accum=args.grad_accum,
                num_processes=num_processes, **{k: getattr(args, k) for k in TRAINING_SETTINGS})


def make_loader(dataset, batch_size: int, shuffle: bool, workers: int, drop_last: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                      persistent_workers=False)


def build_optimizer(args: argparse.Namespace, model: SSANet):
    """timm optimizer over timm's weight-decay (or layer-decay, heads last) groups, each split into
    its body part, at ``--body-lr-scale``, and its SSA module and heads part."""
    no_decay = model.no_weight_decay()
    if args.layer_decay is not None:
        groups = param_groups_layer_decay(model, args.weight_decay, no_decay, layer_decay=args.layer_decay)
    else:
        groups = param_groups_weight_decay(model, args.weight_decay, no_decay)
    body = {id(p) for p in model.body.parameters()}
    split = []
    for group in groups:
        settings = {k: v for k, v in group.items() if k not in ('params', 'param_names')}
        for in_body, scale in ((True, args.body_lr_scale), (False, 1.0)):
            params = [p for p in group['params'] if p.requires_grad and (id(p) in body) == in_body]
            if params:
                split.append({**settings, 'params': params, 'lr_scale': settings.get('lr_scale', 1.0) * scale})
    opt_kwargs = {'momentum': args.momentum} if args.opt.lower() in ('sgd', 'momentum', 'nesterov') else {}
    return create_optimizer_v2(split, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, **opt_kwargs)


def build_scheduler(args: argparse.Namespace, optimizer):
    """timm scheduler stepped once per epoch (``plateau``: on the validation top-1, the paper's)."""
    with warnings.catch_warnings():  # timm deprecates plateau for not checkpointing it; scheduler_state does
        warnings.filterwarnings('ignore', message='PlateauLRScheduler is deprecated', category=FutureWarning)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_rate=0.3 if args.sched == 'plateau' else args.decay_rate, patience_epochs=args.plateau_patience,
            min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, warmup_lr=args.lr * 0.01, plateau_mode='max')
    return scheduler


def scheduler_state(scheduler) -> Dict:
    """The scheduler's state for ``run_state.json``; for plateau also torch's counters (patience,
    cooldown) that timm's ``state_dict`` leaves out."""
    state = {'timm': scheduler.state_dict()}
    inner = getattr(scheduler, 'lr_scheduler', None)
    if inner is not None:
        state['torch'] = inner.state_dict()
    return state


def load_scheduler_state(scheduler, state: Dict) -> None:
    scheduler.load_state_dict(state['timm'])
    if 'torch' in state:
        scheduler.lr_scheduler.load_state_dict(state['torch'])


def setup(args: argparse.Namespace, accelerator: Accelerator) -> Run:
    """Data, model, loaders, optimizer, scheduler and EMA, prepared by accelerate."""
    train_images, val_images = build_data(args)
    classes = train_images.classes
    if val_images.missing_classes:
        accelerator.print(f'note: the validation split has no images of {len(val_images.missing_classes)} '
                          f'training class(es): {val_images.missing_classes[:10]}')
    model = load_model(args.model, pretrained=args.pretrained, num_classes=len(classes), img_size=args.img_size,
                       **model_kwargs(args))
    transform, _ = model_transform(model, args.img_size)
    if is_stream(train_images):
        train_data = TransformedStream(train_images, transform, flip_seed=args.seed)
    else:
        train_data = EpochFlip(Transformed(train_images, transform), seed=args.seed)
    val_data = TransformedStream(val_images, transform) if is_stream(val_images) else Transformed(val_images, transform)
    model.set_distilled_training(True)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.freeze_backbone:
        model.body.requires_grad_(False)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    trainable: torch.nn.Module = model
    if args.cache_features:
        train_data, val_data = cached_datasets(args, accelerator, model, train_data, val_data)
        trainable = HeadsOnCachedFeatures(model)

    # BatchNorm1d cannot train on one image; several processes pad their last batches to full size, a
    # stream's processes stop at the first step one of them cannot fill (ssa_timm.data.streams)
    one_left = accelerator.num_processes == 1 and len(train_data) % args.batch_size == 1
    train_loader = make_loader(train_data, args.batch_size, not is_stream(train_images), args.workers,
                               drop_last=one_left or is_stream(train_images))
    val_loader = make_loader(val_data, args.batch_size, False, args.workers)
    optimizer = build_optimizer(args, model)
    scheduler = build_scheduler(args, optimizer)
    # a stream's loaders stay as they are: each process already reads its own share of it
    trainable, optimizer = accelerator.prepare(trainable, optimizer)
    if not is_stream(train_data):
        train_loader = accelerator.prepare(train_loader)
    if not is_stream(val_data):
        val_loader = accelerator.prepare(val_loader)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    identity = run_identity(args, classes, epoch_samples(train_images), epoch_samples(val_images),
                            accelerator.num_processes)
    loss_fn = SelfADLoss(gamma=args.gamma, temperature=args.temperature, mode=args.loss,
                         label_smoothing=args.label_smoothing)
    probe_inputs = first_images(val_data, 32)
    return Run(args, accelerator, identity, classes, model, trainable, optimizer, scheduler, loss_fn, train_data,
               train_loader, val_loader, probe_inputs, ema)


def cached_datasets(args, accelerator: Accelerator, model: SSANet, train_data: EpochFlip, val_data):
    """Body maps of the frozen body, computed once into ``<output-dir>/feature_cache`` and reused."""
    model.to(accelerator.device)
    cache_dir = Path(args.output_dir) / 'feature_cache'
    meta = dict(model=args.model, model_args=model_kwargs(args), pretrained=args.pretrained, img_size=args.img_size,
                dataset=args.dataset, data_dir=args.data_dir, crop_bbox=args.crop_bbox, seed=args.seed,
                builtin=(args.builtin_train_per_class, args.builtin_val_per_class))
    common = dict(accelerator=accelerator, batch_size=args.batch_size, num_workers=args.workers)
    train_path = build_feature_cache(model, train_data.dataset, cache_dir / 'train.npy', True,
                                     meta=dict(meta, split='train'), **common)
    val_path = build_feature_cache(model, val_data, cache_dir / 'val.npy', False, meta=dict(meta, split='val'), **common)
    targets = lambda data: data.dataset.targets  # noqa: E731  (Transformed -> the image dataset)
    return (CachedFeatures(train_path, targets(train_data.dataset), flip=train_data.schedule),
            CachedFeatures(val_path, targets(val_data)))


def training_step(run: Run, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One forward/backward (and, at the end of an accumulation, optimizer) step; the detached loss."""
    args, accelerator = run.args, run.accelerator
    if args.channels_last and inputs.ndim == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(run.trainable):
        loss = run.loss_fn(run.trainable(inputs), labels)
        accelerator.backward(loss)
        if args.clip_grad is not None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.trainable.parameters(), args.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad()
    return loss.detach()


def train_one_epoch(run: Run, epoch: int) -> bool:
    """Train (the rest of) ``epoch``; True when ``--max-steps`` stopped it before its end."""
    args, accelerator, progress = run.args, run.accelerator, run.progress
    run.trainable.train()
    if args.freeze_backbone:
        run.model.body.eval()  # frozen BatchNorm statistics, as in the cached features
    run.train_data.set_epoch(epoch)
    if is_stream(run.train_data):
        loader = batches_on_every_process(run.train_loader, accelerator, args.grad_accum)
        # the same on every process: the smallest share, in whole accumulation windows
        steps_per_epoch = run.train_data.num_samples // accelerator.num_processes // args.batch_size // args.grad_accum
    else:
        run.train_loader.set_epoch(epoch)
        skip = progress.step_in_epoch * args.grad_accum
        loader = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
        steps_per_epoch = math.ceil(len(run.train_loader) / args.grad_accum)
    loss_sum = torch.zeros((), device=accelerator.device)
    bad_step = torch.full((), -1, device=accelerator.device)  # first non-finite step (1-based), no host sync
    counts = dict(loss_count=0, images=0, start=time.perf_counter())
    for inputs, labels in tqdm(loader, desc=f'epoch {epoch}', total=len(run.train_loader),
                               disable=not accelerator.is_local_main_process):
        loss = training_step(run, inputs.to(accelerator.device), labels.to(accelerator.device))
        finite = torch.isfinite(loss)
        bad_step = torch.where(finite | (bad_step >= 0), bad_step, torch.full_like(bad_step, progress.global_step + 1))
        loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        counts['loss_count'] += 1
        counts['images'] += len(labels) * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        progress.step_in_epoch += 1
        progress.global_step += 1
        if run.ema is not None:
            run.ema.update(run.model, step=progress.global_step)
        stop = bool(args.max_steps) and progress.global_step >= args.max_steps
        mid_epoch = progress.step_in_epoch < steps_per_epoch  # the epoch's end saves anyway
        if mid_epoch and (stop or (args.checkpoint_steps and progress.global_step % args.checkpoint_steps == 0)):
            carry_epoch_sums(run, loss_sum, bad_step, counts)
            loss_sum.zero_()
            save_checkpoint(run)
        if stop and mid_epoch:
            return True
        if stop:
            break
    carry_epoch_sums(run, loss_sum, bad_step, counts)
    return False


def carry_epoch_sums(run: Run, loss_sum: torch.Tensor, bad_step: torch.Tensor, counts: Dict) -> None:
    """Add this process's sums since the last call, over all processes, to the epoch's progress;
    stop the run if a loss was not finite (before anything is saved)."""
    accelerator, progress = run.accelerator, run.progress
    if int(accelerator.reduce(bad_step, reduction='max')) >= 0:
        # the first bad step over all processes: accelerate's reduce has sum and max, so max of the negatives
        never = torch.full_like(bad_step, -2 ** 62)
        step = -int(accelerator.reduce(torch.where(bad_step >= 0, -bad_step, never), reduction='max'))
        raise UserError(f'the training loss became NaN or infinite at epoch {progress.epoch}, step {step}; the run '
                        f'stopped without saving, its last good checkpoint is kept (lower --lr or set --clip-grad)')
    count = torch.tensor(float(counts['loss_count']), device=accelerator.device)
    progress.loss_sum += float(accelerator.reduce(loss_sum, reduction='sum'))
    progress.loss_count += int(accelerator.reduce(count, reduction='sum'))
    progress.images += counts['images']
    now = time.perf_counter()
    progress.seconds += now - counts['start']
    counts.update(loss_count=0, images=0, start=now)


def validate(run: Run, model: SSANet) -> Dict:
    """Per-head top-1/top-5 on the validation set (images, or cached body maps), and the attention
    diagnostics on its first batch."""
    model.eval()
    tta = run.args.tta == 'flip'
    if run.args.cache_features:
        report = evaluate_heads(lambda f: model.logits_per_head(model.forward_ssa(f)), run.val_loader, run.accelerator)
    else:
        report = evaluate_heads(model.forward_per_head, run.val_loader, run.accelerator, tta_flip=tta,
                                per_process=is_stream(run.val_loader.dataset))
    if model.head.attn is not None:
        report['attention'] = probe_attention(model, run.probe_inputs.to(run.accelerator.device),
                                              run.accelerator.autocast(), body_maps=run.args.cache_features)
    return report


def end_epoch(run: Run, epoch: int) -> None:
    """Validate (the EMA too), step the scheduler, export a new best, checkpoint, log the epoch."""
    accelerator, progress = run.accelerator, run.progress
    report = validate(run, run.model)
    candidates = [(report_top1(report), run.model, report, False)]
    if run.ema is not None:
        report['ema'] = validate(run, run.ema.module)
        candidates.append((report_top1(report['ema']), run.ema.module, report['ema'], True))
    top1, best_model, best_report, is_ema = max(candidates, key=lambda c: c[0])
    lr = max(group['lr'] for group in run.optimizer.param_groups)  # the heads' rate of this epoch
    run.scheduler.step(epoch + 1, report_top1(report))
    mean_loss = progress.loss_sum / max(1, progress.loss_count)
    line = dict(epoch=epoch, step=progress.global_step, train_loss=mean_loss, lr=lr,
                images_per_s=progress.images / max(progress.seconds, 1e-9), val=report)
    improved = top1 > progress.best_top1

    def write_epoch() -> None:  # the metrics line before the checkpoint: a resume drops lines it redoes
        if improved:
            export_best(run, best_model, best_report, epoch, is_ema)
        with (run.output_dir / 'metrics.jsonl').open('a') as f:
            f.write(json.dumps(line) + '\n')
    on_main_process(accelerator, write_epoch)
    if improved:
        progress.best_top1 = top1
    progress.epoch, progress.step_in_epoch = epoch + 1, 0
    progress.loss_sum, progress.loss_count, progress.images, progress.seconds = 0.0, 0, 0, 0.0
    save_checkpoint(run)
    accelerator.log({'train_loss': mean_loss, 'val_top1': report_top1(report), 'lr': line['lr'],
                     **{f'attention/{k}': v for k, v in report.get('attention', {}).items() if v is not None}},
                    step=epoch)
    heads = ', '.join(f'{k} {v["top1"]:.1f}%' for k, v in report['heads'].items())
    attention = report.get('attention')
    accelerator.print(f'epoch {epoch}: loss {mean_loss:.4f}, val top-1 {report["output"]["top1"]:.1f}% ({heads})' + (
        f'; attention: alpha {attention["alpha"]:+.3f}, row entropy {attention["entropy_ratio"]:.2f} of uniform, '
        f'row max {attention["row_max"]:.2f}' if attention and attention['alpha'] is not None else ''))


def export_best(run: Run, model: SSANet, report: Dict, epoch: int, is_ema: bool) -> None:
    """Export ``model`` to ``<output-dir>/best`` through a temporary sibling."""
    args = run.args
    training = dict(model=args.model, dataset=args.dataset, pretrained=args.pretrained, img_size=args.img_size,
                    epoch=epoch, loss=args.loss, freeze_backbone=args.freeze_backbone, ema=is_ema, seed=args.seed)
    with atomic_dir(run.output_dir / 'best') as tmp:
        export_model(model, str(tmp), run.classes, args.img_size, extra_config={'metrics': report, 'training': training})


def on_main_process(accelerator: Accelerator, work) -> None:
    """Run ``work()`` on the main process; its error, if any, is raised on every process (so no
    process waits at the next barrier for one that failed)."""
    error = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as e:  # re-raised below, on every process
            if accelerator.num_processes == 1:
                raise
            error = str(e) if isinstance(e, UserError) else f'the main process failed: {type(e).__name__}: {e}'
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise UserError(error)


def checkpoint_index(folder: Path) -> int:
    """N of a ``checkpoint_N`` folder (-1 for other names)."""
    suffix = folder.name.rpartition('_')[2]
    return int(suffix) if folder.name.startswith('checkpoint_') and suffix.isdigit() else -1


def checkpoints(output_dir: Path) -> list:
    """The ``checkpoint_N`` folders of a run, newest first."""
    found = [p for p in (output_dir / 'checkpoints').glob('checkpoint_*') if checkpoint_index(p) >= 0]
    return sorted(found, key=checkpoint_index, reverse=True)


def save_checkpoint(run: Run) -> None:
    """accelerate's state (model, optimizer, sampler, RNG) + EMA + ``run_state.json`` (identity,
    progress, scheduler) into a temporary folder, renamed to the next ``checkpoint_N``; the oldest
    beyond ``--keep-checkpoints`` are removed."""
    accelerator, out = run.accelerator, run.output_dir / 'checkpoints'
    existing = checkpoints(run.output_dir)
    final = out / f'checkpoint_{checkpoint_index(existing[0]) + 1 if existing else 0}'
    tmp = out / f'.{final.name}.tmp'
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()

    def complete() -> None:
        if run.ema is not None:
            save_file({k: v.contiguous() for k, v in run.ema.module.state_dict().items()}, str(tmp / EMA_FILE))
        state = dict(identity=run.identity, progress=asdict(run.progress), scheduler=scheduler_state(run.scheduler))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        tmp.rename(final)
        for old in checkpoints(run.output_dir)[run.args.keep_checkpoints:]:
            doomed = old.with_name(f'.{old.name}.del')  # out of the checkpoint names first, then deleted
            old.rename(doomed)
            shutil.rmtree(doomed)
        shutil.rmtree(run.output_dir / REPLACED, ignore_errors=True)  # --overwrite: the old run, now replaced
    on_main_process(accelerator, complete)
    accelerator.wait_for_everyone()


def read_checkpoint(folder: Path, identity: Dict) -> Dict:
    """``run_state.json`` of a checkpoint, after checking that its files are complete and readable
    and that it was saved by a run with the same identity (``UserError`` naming the file or field)."""
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise UserError(f'{folder} is not a checkpoint of this recipe (no {STATE_FILE})')
    try:
        state = json.loads(state_path.read_text())
        saved, progress = dict(state['identity']), Progress(**state['progress'])
        if not all(isinstance(getattr(progress, f), (int, float)) for f in asdict(progress)) or 'timm' not in state['scheduler']:
            raise TypeError('progress or scheduler fields of the wrong type')
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f'{state_path} is damaged ({type(e).__name__}: {e})') from e
    for key, value in identity.items():
        if saved.get(key) != value:
            shown = lambda v: f'{len(v)} classes' if key == 'classes' else repr(v)  # noqa: E731
            raise UserError(f'checkpoint {folder} was saved by a run with {key}={shown(saved.get(key))}; this run has '
                            f'{key}={shown(value)}')
    for path in sorted(folder.glob('*.safetensors')):
        try:
            load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise UserError(f'{path} is damaged or truncated ({e})') from e
    for path in sorted([*folder.glob('optimizer*.bin'), *folder.glob('scaler*.pt')]):
        try:
            torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # torch raises several types for a damaged archive
            raise UserError(f'{path} is damaged or truncated ({str(e).splitlines()[0]})') from e
    return state


def resume(run: Run) -> None:
    """Load ``--resume``: a folder, or for 'latest' the newest complete checkpoint, skipping (with a
    warning) damaged ones. A checkpoint of another run (model, data, classes, settings) is refused.
    The main process picks and checks it; every process then loads the same one."""
    accelerator = run.accelerator
    chosen = [None]

    def pick() -> None:
        chosen[0] = str(pick_checkpoint(run))
    on_main_process(accelerator, pick)  # a refusal is raised on every process
    if accelerator.num_processes > 1:
        chosen = broadcast_object_list(chosen)
    folder = Path(chosen[0])
    state = json.loads((folder / STATE_FILE).read_text())
    accelerator.load_state(str(folder))
    load_scheduler_state(run.scheduler, state['scheduler'])
    run.progress = Progress(**state['progress'])
    if run.ema is not None:
        run.ema.module.load_state_dict(load_file(str(folder / EMA_FILE)) if (folder / EMA_FILE).is_file()
                                       else run.model.state_dict())
    on_main_process(accelerator, lambda: keep_metrics_before(run.output_dir / 'metrics.jsonl', run.progress.epoch))
    accelerator.print(f'resumed from {folder}: epoch {run.progress.epoch}, step {run.progress.global_step}')


def pick_checkpoint(run: Run) -> Path:
    """The checkpoint ``--resume`` names, checked (``read_checkpoint``); for 'latest' the newest good one."""
    args = run.args
    candidates = checkpoints(run.output_dir) if args.resume == 'latest' else [Path(args.resume)]
    if not candidates:
        raise UserError(f'--resume latest: no checkpoint under {run.output_dir / "checkpoints"}')
    for folder in candidates:
        if not folder.is_dir():
            raise UserError(f'--resume {folder}: not a checkpoint folder')
        try:
            state = read_checkpoint(folder, run.identity)
            if state['progress']['step_in_epoch'] and is_stream(run.train_data):
                raise UserError(f'{folder} was saved in the middle of epoch {state["progress"]["epoch"]}; a streamed '
                                'dataset resumes only from a checkpoint saved at the end of an epoch')
        except UserError as e:
            if args.resume != 'latest' or 'was saved by a run with' in str(e):
                raise
            print(f'warning: skipping checkpoint {folder}: {e}', flush=True)
            continue
        return folder
    raise UserError(f'--resume latest: every checkpoint under {run.output_dir / "checkpoints"} is damaged')


def keep_metrics_before(path: Path, epoch: int) -> None:
    """Keep the ``metrics.jsonl`` lines of the epochs before ``epoch`` (a resume redoes the others;
    a line cut short by a kill is dropped)."""
    if not path.is_file():
        return
    kept = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get('epoch'), int) and line['epoch'] < epoch:
            kept.append(text)
    atomic_write_text(path, ''.join(f'{text}\n' for text in kept))


def training_function(args: argparse.Namespace) -> Dict:
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
        log_with=args.log_with, project_dir=args.output_dir, dynamo_backend='inductor' if args.compile else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    lock = claim_output_dir(args, accelerator)
    try:
        set_seed(args.seed)
        run = setup(args, accelerator)
        if args.log_with:
            accelerator.init_trackers('ssanet', config={k: ','.join(v) if isinstance(v, list) else v
                                                        for k, v in vars(args).items() if v is not None})
        if args.resume:
            resume(run)
        print(f'process {accelerator.process_index}/{accelerator.num_processes} on {accelerator.device}: '
              f'{len(run.train_loader)} training batches per epoch', flush=True)
        for epoch in range(run.progress.epoch, args.epochs):
            if train_one_epoch(run, epoch):
                break
            end_epoch(run, epoch)
            if args.max_steps and run.progress.global_step >= args.max_steps:
                break
        accelerator.wait_for_everyone()
        accelerator.end_training()
    finally:
        lock.release()
    progress, out = run.progress, run.output_dir
    if progress.best_top1 >= 0:
        accelerator.print(f'best val top-1 (model output): {progress.best_top1:.2f}% '
                          f'(chance {100 / len(run.classes):.1f}%); model exported to {out / "best"}')
    return dict(best_top1=progress.best_top1, epochs_done=progress.epoch, global_step=progress.global_step,
                output_dir=str(out))


def main(argv=None) -> Dict:
    return training_function(parse_args(argv))


if __name__ == '__main__':
    exit_on_user_error(main)
