"""Train SSANet with Self-AD (paper section 4.1) on CPU, one GPU, many GPUs or many machines.

One script for every setup; `accelerate launch` decides where it runs:

    python recipes/train.py                                   # built-in dataset, small body, CPU ok
    accelerate launch recipes/train.py --model ssanet_vgg16_plus --dataset cub --data-dir /data/CUB_200_2011
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 0 recipes/train.py --cpu --epochs 1

The run owns ``--output-dir``: each epoch writes a checkpoint (``checkpoints/checkpoint_N``, with the
run's identity and progress in ``run_state.json``), a JSONL line of metrics with the attention
diagnostics, and exports the best model to ``best/`` in timm's ``save_for_hf`` layout. ``--resume
latest`` goes on from the newest complete checkpoint, ``--resume auto`` too or starts fresh. SIGTERM,
SIGINT, SIGUSR1 or SIGHUP stop the run at the next step with a checkpoint (exit status 128 + the signal).
"""
import argparse
import dataclasses
from functools import partial
from pathlib import Path
from typing import Dict

from timm.optim import get_optimizer_class, list_optimizers
from timm.utils import ModelEmaV3

from ssa_timm import SelfADLoss
from ssa_timm.cli import (
    HelpFormatter, add_dataset_args, add_img_size_arg, at_least, deprecated_alias, finite_float, fraction,
    non_negative_float, positive_float, trackers)
from ssa_timm.data import first_images
from ssa_timm.data.streams import epoch_samples, is_stream
from ssa_timm.errors import UserError, exit_on_user_error
from ssa_timm.hub import attention_args
from ssa_timm.launch import attach_worker
from ssa_timm.metrics import report_top1
from ssa_timm.processes import from_main, run_on_main
from ssa_timm.train import (
    BUILTIN_DEFAULTS, PAPER_DEFAULTS, CheckpointStore, Progress, RunConfig, StopRequest, Trainee, best_of,
    build_datasets, build_loaders, build_model, build_optimizer, build_scheduler, build_training_data,
    claim_output_dir, epoch_record, epoch_summary, load_initial_checkpoint, make_accelerator, prepare,
    recorded_model_args, resume_run, scheduler_state, seed_everything, set_up_model, tracker_values, train_one_epoch,
    write_epoch)

DEFAULT = RunConfig()


def parse_args(argv=None) -> RunConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    add_zoom_args(p)
    add_data_args(p)
    add_loss_args(p)
    add_optimization_args(p)
    add_run_args(p)
    config = RunConfig.from_mapping(vars(p.parse_args(argv)))
    check_config(p, config)
    return config


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Model')
    g.add_argument('--model', help='ssanet_<timm body>_<aggregation> (registered or not); '
                   f'default {BUILTIN_DEFAULTS["model"]} on builtin, else {PAPER_DEFAULTS["model"]}')
    g.add_argument('--body-feature-index', type=int, help="read the body's map at this feature_info index, pruning "
                   "later stages (default: 2, ResNet-18's layer2, for ResNet-18 on builtin; else the last map)")
    add_img_size_arg(g, f'default {BUILTIN_DEFAULTS["img_size"]} on builtin, else {PAPER_DEFAULTS["img_size"]}')
    g.add_argument('--scale-attn', action='store_true',
                   help='scale the attention logits by 1/sqrt(d) (paper: unscaled)')
    g.add_argument('--qk-norm', action=argparse.BooleanOptionalAction, help='cosine attention: L2-normalised A '
                   'and B with a learnable temperature; --no-qk-norm: the paper\'s unscaled dot products (default: the '
                   "name's own: on for the modern names and any timm body, off for the paper's 25 names; a resumed "
                   'run keeps the attention it was trained with)')
    g.add_argument('--sagan-qk', action='store_true', help="SAGAN's safeguard: spectrally normalised query/key convs "
                   'of K/8 channels (paper: none)')
    g.add_argument('--alpha-init', type=finite_float, default=DEFAULT.alpha_init,
                   help="the attention's alpha at the start (paper: 0; another value lets the attention learn from "
                   'the first step)')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction,
                   help='ImageNet body weights (default: on, except for the built-in dataset)')
    g.add_argument('--pretrained-path', metavar='FILE', help="body weights from a local file, in the body's own "
                   "key layout (timm's checkpoint filter adapts them, e.g. a ViT at another grid)")
    g.add_argument('--initial-checkpoint', metavar='PATH', help='start from a whole SSANet: an export folder or a '
                   '.safetensors file (its classifiers too when the class count matches)')
    g.add_argument('--freeze-body', action='store_true', help='train the SSA module and heads only (the paper)')
    deprecated_alias(g, '--freeze-backbone', '--freeze-body', nargs=0)
    g.add_argument('--cache-features', action='store_true', help='with --freeze-body: train from cached body maps')
    g.add_argument('--cache-dir', metavar='DIR', help='the feature cache folder, shareable by runs (one file per body, '
                   'weights, data and split; a lock makes a missing one built once); default: feature_cache in '
                   '--output-dir')


def add_zoom_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Zoom (a second look where the attention points; not in the paper)')
    g.add_argument('--zoom', action='store_true', help='look twice: crop the image where the SSA attention points '
                   'and average both passes (ssa_timm.zoom)')
    g.add_argument('--zoom-threshold', type=fraction, default=DEFAULT.zoom_threshold,
                   help='zoom box: the cells with at least this fraction of the largest attended mass')
    g.add_argument('--zoom-margin', type=non_negative_float, default=DEFAULT.zoom_margin,
                   help="zoom box: each side moved out by this fraction of the box's size")
    g.add_argument('--zoom-min-size', type=fraction, default=DEFAULT.zoom_min_size,
                   help="zoom box: at least this fraction of the image's width and height")


def add_data_args(p: argparse.ArgumentParser) -> None:
    add_dataset_args(p, training=True)
    g = p.add_argument_group('Data loading')
    g.add_argument('--workers', type=at_least(0), default=DEFAULT.workers, help='loader worker processes')


def add_loss_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Loss')
    g.add_argument('--loss', choices=('ad', 'ce'), default=DEFAULT.loss,
                   help='Self-AD (Eq. 5) or CE on both heads')
    g.add_argument('--gamma', type=non_negative_float, default=DEFAULT.gamma,
                   help="weight of Self-AD's second CE term (Eq. 5)")
    g.add_argument('--temperature', type=positive_float, default=DEFAULT.temperature,
                   help='distillation temperature T')
    g.add_argument('--label-smoothing', type=fraction, default=DEFAULT.label_smoothing,
                   help='label smoothing of the CE terms')


def add_optimization_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', help="timm optimizer: momentum (SGD with momentum), sgd (Nesterov SGD), adamw, lamb, ...; "
                   f'default: {BUILTIN_DEFAULTS["opt"]} on builtin, else {PAPER_DEFAULTS["opt"]} (the paper)')
    g.add_argument('--lr', type=positive_float, default=DEFAULT.lr, help='learning rate of the SSA module and heads')
    g.add_argument('--body-lr-scale', type=non_negative_float, default=DEFAULT.body_lr_scale,
                   help="the body's learning rate relative to --lr (fine-grained practice: 0.1)")
    g.add_argument('--layer-decay', type=positive_float, help="timm layer-wise lr decay (the heads last)")
    g.add_argument('--momentum', type=non_negative_float, default=DEFAULT.momentum, help='SGD momentum')
    g.add_argument('--weight-decay', type=non_negative_float,
                   help=f'default: {BUILTIN_DEFAULTS["weight_decay"]} on builtin, '
                   f'else {PAPER_DEFAULTS["weight_decay"]}')
    g.add_argument('--clip-grad', type=positive_float, help='clip the gradient norm to this value')

    g = p.add_argument_group('Schedule')
    g.add_argument('--epochs', type=at_least(1), default=DEFAULT.epochs, help='may grow when resuming')
    g.add_argument('--max-steps', type=at_least(1), help='stop (after a checkpoint) at this optimizer step')
    g.add_argument('--batch-size', type=at_least(2), default=DEFAULT.batch_size, help='per process (BatchNorm needs 2)')
    g.add_argument('--grad-accum', type=at_least(1), default=DEFAULT.grad_accum)
    g.add_argument('--sched', choices=('plateau', 'cosine', 'step'), default=DEFAULT.sched,
                   help='plateau: lr x0.3 after --plateau-patience epochs without a better val top-1 (paper)')
    g.add_argument('--plateau-patience', type=at_least(0), default=DEFAULT.plateau_patience)
    g.add_argument('--decay-epochs', type=positive_float, default=DEFAULT.decay_epochs,
                   help='step: epochs between decays')
    g.add_argument('--decay-rate', type=positive_float, default=DEFAULT.decay_rate, help='step: lr factor')
    g.add_argument('--warmup-epochs', type=at_least(0), default=DEFAULT.warmup_epochs)
    g.add_argument('--min-lr', type=non_negative_float, default=DEFAULT.min_lr)



def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Weights averaging, speed and evaluation')
    g.add_argument('--model-ema', action='store_true',
                   help="keep timm's ModelEmaV3 of the weights; evaluated each epoch")
    g.add_argument('--model-ema-decay', type=fraction, default=DEFAULT.model_ema_decay)
    g.add_argument('--mixed-precision', choices=('no', 'fp16', 'bf16'),
                   help='default: what accelerate launch was configured with')
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the training step (eval and export stay eager)')
    g.add_argument('--grad-checkpointing', action='store_true', help="recompute the body's activations in backward")
    g.add_argument('--tta', choices=('none', 'flip'), default=DEFAULT.tta,
                   help='validation also with logits averaged over each image and its mirror; flip then picks the best')

    g = p.add_argument_group('Run folder, checkpoints and resume')
    g.add_argument('--output-dir', default=DEFAULT.output_dir, help='the run folder')
    g.add_argument('--overwrite', action='store_true', help='replace the run already in --output-dir')
    g.add_argument('--resume', help="'latest' (the newest complete checkpoint), 'auto' (that, or a fresh run when "
                   "there is none: what a requeued job passes) or a checkpoint folder")
    g.add_argument('--keep-checkpoints', type=at_least(1), default=DEFAULT.keep_checkpoints,
                   help='the newest checkpoints kept')
    g.add_argument('--checkpoint-steps', type=at_least(1), help='also checkpoint every N optimizer steps')

    g = p.add_argument_group('Reproducibility, devices and logging')
    g.add_argument('--seed', type=at_least(0), default=DEFAULT.seed,
                   help='seeds the initialisation, the data order and the flips (and the built-in data)')
    g.add_argument('--deterministic', action='store_true',
                   help="torch's deterministic algorithms and, on CPU, one thread: the same metrics for the same "
                   'seed on the same machine')
    g.add_argument('--log-with', type=trackers, help='accelerate trackers, comma separated: tensorboard, wandb, ...')
    g.add_argument('--cpu', action='store_true', help='run on CPU even when a GPU is present')
    g.add_argument('--debug', action='store_true', help='show the traceback of user errors')


def check_config(p: argparse.ArgumentParser, config: RunConfig) -> None:
    """Refuse combinations and values that would fail later, with argparse's exit status 2."""
    if config.cache_dir and not config.cache_features:
        p.error('--cache-dir is the folder of --cache-features; give both')
    if config.cache_features and not config.freeze_body:
        p.error('--cache-features needs --freeze-body (a training body changes its features)')
    if config.alpha_init and config.model and config.model.endswith(('_no_alpha', '_no_attention')):
        p.error(f'--alpha-init sets where the attention\'s alpha starts; {config.model} has no alpha')
    if config.qk_norm and config.scale_attn:
        p.error('--qk-norm and --scale-attn exclude each other (qk_norm learns its own logit temperature)')
    if config.tta != 'none' and config.cache_features:
        p.error('--tta flip mirrors images; it cannot run on cached body maps (--cache-features)')
    if config.resume and config.overwrite:
        p.error('--resume continues the run in --output-dir, --overwrite replaces it: give one')
    if config.warmup_epochs >= config.epochs:
        p.error(f'--warmup-epochs ({config.warmup_epochs}) must be below --epochs ({config.epochs})')
    if config.opt.lower() not in list_optimizers():
        p.error(f"--opt {config.opt!r} is not one of timm's optimizers: {', '.join(list_optimizers())}")
    try:  # listed optimizers whose package (bitsandbytes, apex, ...) is missing fail here
        get_optimizer_class(config.opt)
    except (AssertionError, ImportError, RuntimeError) as e:
        p.error(f'--opt {config.opt} cannot be used here: {e}')
    if config.opt.lower() in ('sgd', 'nesterov') and config.momentum == 0:
        p.error("--opt sgd is timm's Nesterov SGD, which needs --momentum > 0; --opt momentum is plain SGD")
    if Path(config.model).is_dir() or config.model.startswith(('hf-hub:', 'local-dir:')):
        return
    try:  # the model name and the input size, on the meta device: nothing is allocated or loaded
        build_model(dataclasses.replace(config, pretrained=False, pretrained_path=None, initial_checkpoint=None), 2,
                    device='meta')
    except (UserError, ValueError) as e:
        p.error(f'--model {config.model} at --img-size {config.img_size}: {e}')


def training_function(config: RunConfig) -> Dict:
    attach_worker()  # under a launcher: its death stops this process
    accelerator = make_accelerator(config)
    # stop signals checkpoint from here on (ssa-timm-launch forwards them once the handler is in place)
    # run as a script, the process ends with the run: a late signal while it exits is ignored
    with StopRequest(until_exit=__name__ == '__main__') as stop, \
            claim_output_dir(config.output_path, accelerator, config.resume, config.overwrite) as folder:
        # a resumed run keeps the attention it was trained with, should the name's default have changed
        config = config.with_recorded_attention(recorded_model_args(config.output_path, config.resume))
        seed_everything(config, accelerator)
        # data: validation labels index the training classes
        train_images, val_images = build_datasets(config, accelerator)
        classes = train_images.classes
        # model (its own input size decides the transforms and the export), and the data it trains on
        model = starting_model(config, len(classes), accelerator)
        train_data, val_data, trainable = build_training_data(config, model, train_images, val_images, accelerator)
        train_loader, val_loader = build_loaders(config, accelerator, train_data, val_data)
        # optimizer, schedule, loss; then accelerate prepares what it runs
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config)
        loss_fn = SelfADLoss(gamma=config.gamma, temperature=config.temperature, mode=config.loss,
                             label_smoothing=config.label_smoothing)
        trainable, optimizer, train_loader, val_loader = prepare(accelerator, trainable, optimizer, train_loader,
                                                                 val_loader)
        ema = ModelEmaV3(model, decay=config.model_ema_decay) if config.model_ema else None
        trainee = Trainee(model, trainable, optimizer, loss_fn, ema)
        if config.log_with:
            accelerator.init_trackers('ssanet', config=config.trackers_config())
        # resume: the checkpoint must come from a run with this identity
        identity = config.identity(classes, epoch_samples(train_images), epoch_samples(val_images),
                                   accelerator.num_processes, attention_args(model))
        store = CheckpointStore(config.output_path, accelerator, config.keep_checkpoints,
                                partial(run_on_main, accelerator), owner=from_main(accelerator, folder.lock.token),
                                fence=folder.fence)
        progress = resume(config, accelerator, folder, store, identity, scheduler, ema, model, is_stream(train_data))

        def checkpoint() -> None:
            state = dict(identity=identity, progress=dataclasses.asdict(progress), scheduler=scheduler_state(scheduler))
            store.save(state, ema.module if ema else None)
            if config.overwrite:
                run_on_main(accelerator, folder.drop_replaced)  # the replaced run, now that this one has a checkpoint

        probe_inputs = first_images(val_data, 32)  # a fixed validation batch for the attention diagnostics
        print(f'process {accelerator.process_index}/{accelerator.num_processes} on {accelerator.device}: '
              f'{len(train_loader)} training batches per epoch', flush=True)
        # the epoch loop: train, validate (the EMA too), export a new best, checkpoint
        for epoch in range(progress.epoch, config.epochs):
            if not train_one_epoch(trainee, config, accelerator, train_loader, train_data, progress, epoch,
                                   checkpoint, stop):
                break  # --max-steps or a stop signal, after a mid-epoch checkpoint
            report, best = best_of(trainee, config, accelerator, val_loader, probe_inputs)
            record = epoch_record(epoch, progress, optimizer, report)
            scheduler.step(epoch + 1, report_top1(report))
            run_on_main(accelerator, partial(write_epoch, folder, record, best, progress.best_top1, classes, config))
            progress.best_top1 = max(progress.best_top1, best[0])
            progress.start_epoch(epoch + 1)
            checkpoint()
            accelerator.log(tracker_values(record, report_top1(report)), step=epoch)
            accelerator.print(epoch_summary(record))
            if (config.max_steps and progress.global_step >= config.max_steps) or stop.requested(accelerator):
                break
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return finish(accelerator, config, progress, stop, store, len(classes))


def starting_model(config: RunConfig, num_classes: int, accelerator):
    """The model with its starting weights (a note when an initial checkpoint's classifiers start fresh)."""
    model = build_model(config, num_classes)
    if config.initial_checkpoint:
        for note in load_initial_checkpoint(model, Path(config.initial_checkpoint)):
            accelerator.print(note)
    set_up_model(model, config)
    return model


def resume(config: RunConfig, accelerator, folder, store: CheckpointStore, identity: Dict, scheduler, ema, model,
           streamed: bool) -> Progress:
    """Where the run starts: ``--resume``'s checkpoint (or a fresh progress), ``metrics.jsonl`` cut to the
    epochs before it."""
    if not config.resume:
        return Progress()
    progress, lines = resume_run(store, config.resume, identity, scheduler, ema.module if ema else None, model,
                                 end_of_epoch_only=streamed)
    accelerator.print('\n'.join(lines))
    run_on_main(accelerator, partial(folder.keep_metrics_before, progress.epoch))
    return progress


def finish(accelerator, config: RunConfig, progress: Progress, stop: StopRequest, store: CheckpointStore,
           num_classes: int) -> Dict:
    """Say where the run ended; a run a stop signal ended exits with status 128 + the signal."""
    out = config.output_path
    if stop.signum and progress.epoch < config.epochs:
        newest = store.folders()[:1]
        where = f'checkpoint {newest[0]}' if newest else f'no checkpoint under {store.folder} yet'
        accelerator.print(f'stopped by {stop.name} at epoch {progress.epoch}, step {progress.global_step}: {where}; '
                          'continue with --resume latest (or auto)', flush=True)
        raise SystemExit(stop.exit_status())
    if progress.best_top1 >= 0:
        accelerator.print(f'best val top-1 (model output): {progress.best_top1:.2f}% '
                          f'(chance {100 / num_classes:.1f}%); model exported to {out / "best"}')
    return dict(best_top1=progress.best_top1, epochs_done=progress.epoch, global_step=progress.global_step,
                output_dir=str(out))


def main(argv=None) -> Dict:
    return training_function(parse_args(argv))


if __name__ == '__main__':
    exit_on_user_error(main)
