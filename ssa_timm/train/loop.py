"""The training loop: one optimizer step, one epoch with its loss sums and non-finite guard, and
validation with the attention diagnostics.

Nothing here waits for the host on a GPU step: the loss sums and the first non-finite step are kept
on the device and read when the epoch (or a mid-epoch checkpoint) ends.
"""
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate.utils import send_to_device
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from ..data.streams import batches_on_every_process, is_stream
from ..diagnostics import probe_attention
from ..errors import UserError
from ..feature_cache import body_maps_of, cached_logits_per_head
from ..localization import scene_localization
from ..loss import SelfADLoss
from ..metrics import evaluate_heads, report_top1
from .checkpoint import Progress
from .config import RunConfig
from .preemption import StopRequest

__all__ = ['NonFiniteLoss', 'Trainee', 'best_of', 'train_one_epoch', 'training_step', 'validate']


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite."""


@dataclass
class Trainee:
    """What the loop trains: the model, the module accelerate prepared (the model itself, or its SSA
    module and heads on cached body maps), the prepared optimizer, the loss and the EMA of the weights."""
    model: torch.nn.Module
    trainable: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: SelfADLoss
    ema: Optional[ModelEmaV3] = None


def training_step(trainee: Trainee, config: RunConfig, accelerator, inputs: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """One forward/backward (and, at the end of an accumulation, optimizer) step; the detached loss."""
    if config.channels_last and isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(trainee.trainable):
        loss = trainee.loss_fn(trainee.trainable(inputs), labels)
        accelerator.backward(loss)
        if config.clip_grad is not None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(trainee.trainable.parameters(), config.clip_grad)
        trainee.optimizer.step()
        trainee.optimizer.zero_grad()
    return loss.detach()


class EpochSums:
    """This process's loss sum and first non-finite step since the last ``carry``, on the device."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.bad_step = torch.full((), -1, device=accelerator.device)  # first non-finite step (1-based)
        self.loss_count, self.images, self.start = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int, step: int) -> None:
        finite = torch.isfinite(loss)
        self.bad_step = torch.where(finite | (self.bad_step >= 0), self.bad_step, torch.full_like(self.bad_step, step))
        self.loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        self.loss_count += 1
        self.images += images

    def carry(self, progress: Progress) -> None:
        """Add the sums over all processes to ``progress`` and start new ones; ``NonFiniteLoss`` (before
        anything is saved) if a loss was not finite."""
        accelerator = self.accelerator
        if int(accelerator.reduce(self.bad_step, reduction='max')) >= 0:
            # the first bad step over all processes: accelerate's reduce has sum and max, so max of the negatives
            never = torch.full_like(self.bad_step, -2 ** 62)
            step = -int(accelerator.reduce(torch.where(self.bad_step >= 0, -self.bad_step, never), reduction='max'))
            raise NonFiniteLoss(f'the training loss became NaN or infinite at epoch {progress.epoch}, step {step}; the '
                                'run stopped without saving, its last good checkpoint is kept (lower --lr or set '
                                '--clip-grad)')
        count = torch.tensor(float(self.loss_count), device=accelerator.device)
        progress.loss_sum += float(accelerator.reduce(self.loss_sum, reduction='sum'))
        progress.loss_count += int(accelerator.reduce(count, reduction='sum'))
        progress.images += self.images
        now = time.perf_counter()
        progress.seconds += now - self.start
        self.loss_sum.zero_()
        self.loss_count, self.images, self.start = 0, 0, now


def _epoch_batches(loader, train_data, config: RunConfig, accelerator, progress: Progress, epoch: int):
    """The batches left of ``epoch`` and the optimizer steps of a whole epoch (the same on every process)."""
    train_data.set_epoch(epoch)
    if is_stream(train_data):
        # the smallest share of a stream, in whole accumulation windows
        steps = train_data.num_samples // accelerator.num_processes // config.batch_size // config.grad_accum
        return batches_on_every_process(loader, accelerator, config.grad_accum), steps
    loader.set_epoch(epoch)
    skip = progress.step_in_epoch * config.grad_accum
    steps = math.ceil(len(loader) / config.grad_accum)
    return (accelerator.skip_first_batches(loader, skip) if skip else loader), steps


def train_one_epoch(trainee: Trainee, config: RunConfig, accelerator, loader, train_data, progress: Progress,
                    epoch: int, save: Callable[[], None], stop: StopRequest) -> bool:
    """Train (the rest of) ``epoch``: True when it ran to its end, False when ``max_steps`` or a stop
    signal ended it early (after ``save()`` wrote a mid-epoch checkpoint). ``checkpoint_steps`` also
    saves every so many optimizer steps."""
    trainee.trainable.train()
    if config.freeze_body:
        trainee.model.body.eval()  # frozen BatchNorm statistics, as in the cached features
    batches, steps_per_epoch = _epoch_batches(loader, train_data, config, accelerator, progress, epoch)
    sums = EpochSums(accelerator)
    for inputs, labels in tqdm(batches, desc=f'epoch {epoch}', total=len(loader),
                               disable=not accelerator.is_local_main_process):
        loss = training_step(trainee, config, accelerator, send_to_device(inputs, accelerator.device),
                             labels.to(accelerator.device))
        sums.add(loss, len(labels) * accelerator.num_processes, progress.global_step + 1)
        if not accelerator.sync_gradients:
            continue
        progress.step_in_epoch += 1
        progress.global_step += 1
        if trainee.ema is not None:
            trainee.ema.update(trainee.model, step=progress.global_step)
        mid_epoch = progress.step_in_epoch < steps_per_epoch  # the epoch's end saves anyway
        stopping = ((bool(config.max_steps) and progress.global_step >= config.max_steps)
                    or stop.requested(accelerator, progress.global_step))
        periodic = bool(config.checkpoint_steps) and progress.global_step % config.checkpoint_steps == 0
        if mid_epoch and (stopping or periodic):
            sums.carry(progress)
            save()
        if stopping and mid_epoch:
            return False
        if stopping:
            break
    sums.carry(progress)
    return True


def validate(model: torch.nn.Module, config: RunConfig, accelerator, loader, probe_inputs: torch.Tensor) -> Dict:
    """Per-head top-1/top-5 on the validation set (images, or cached body maps), the attention
    diagnostics on a fixed batch of it and, on the built-in scene task, the localisation metrics."""
    model.eval()
    if config.cache_features:
        report = evaluate_heads(partial(cached_logits_per_head, model), loader, accelerator)
    else:
        report = evaluate_heads(model.forward_per_head, loader, accelerator, tta_flip=config.tta == 'flip',
                                per_process=is_stream(loader.dataset))
    if model.head.attn is not None:
        probe = body_maps_of(probe_inputs) if config.cache_features else probe_inputs
        report['attention'] = probe_attention(model, probe.to(accelerator.device), accelerator.autocast(),
                                              body_maps=config.cache_features)
    if config.dataset == 'builtin' and config.builtin_task == 'scene':  # where the model looks: part boxes
        report['localization'] = scene_localization(model, config, loader.dataset, accelerator)
    return report


def best_of(trainee: Trainee, config: RunConfig, accelerator, loader,
            probe_inputs: torch.Tensor) -> Tuple[Dict, Tuple[float, torch.nn.Module, Dict, bool]]:
    """Validate the model (and its EMA, whose report goes in as ``'ema'``): the model's report and the
    better candidate as ``(top-1, module, its report, is the EMA)``."""
    report = validate(trainee.model, config, accelerator, loader, probe_inputs)
    candidates: List[Tuple[float, Any, Dict, bool]] = [(report_top1(report), trainee.model, report, False)]
    if trainee.ema is not None:
        report['ema'] = validate(trainee.ema.module, config, accelerator, loader, probe_inputs)
        candidates.append((report_top1(report['ema']), trainee.ema.module, report['ema'], True))
    return report, max(candidates, key=lambda c: c[0])
