"""Optimizer and learning-rate schedule of a run, from timm's factories, and the schedule's state.

The optimizer's groups are timm's weight-decay (or layer-decay, heads last) groups, each split into
its body part, at ``body_lr_scale``, and its SSA module and heads part. The schedule is stepped once
per epoch (``plateau``: on the validation top-1, the paper's).
"""
import warnings
from typing import Any, Dict, List

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2

from .config import RunConfig

__all__ = ['build_optimizer', 'build_scheduler', 'load_scheduler_state', 'scheduler_state']


def build_optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """timm optimizer ``config.opt`` over the trainable parameters of ``model`` (an SSANet)."""
    no_decay = model.no_weight_decay()
    if config.layer_decay is not None:
        groups = param_groups_layer_decay(model, config.weight_decay, no_decay, layer_decay=config.layer_decay)
    else:
        groups = param_groups_weight_decay(model, config.weight_decay, no_decay)
    body = {id(p) for p in model.body.parameters()}
    split: List[Dict[str, Any]] = []
    for group in groups:
        settings = {k: v for k, v in group.items() if k not in ('params', 'param_names')}
        for in_body, scale in ((True, config.body_lr_scale), (False, 1.0)):
            params = [p for p in group['params'] if p.requires_grad and (id(p) in body) == in_body]
            if params:
                split.append({**settings, 'params': params, 'lr_scale': settings.get('lr_scale', 1.0) * scale})
    opt_kwargs = {'momentum': config.momentum} if config.opt.lower() in ('sgd', 'momentum', 'nesterov') else {}
    return create_optimizer_v2(split, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay, **opt_kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig):
    """timm scheduler ``config.sched`` over ``config.epochs`` epochs (plateau decays by 0.3, the paper's)."""
    with warnings.catch_warnings():  # timm deprecates plateau for not checkpointing it; scheduler_state does
        warnings.filterwarnings('ignore', message='PlateauLRScheduler is deprecated', category=FutureWarning)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=config.sched, num_epochs=config.epochs, decay_epochs=config.decay_epochs,
            decay_rate=0.3 if config.sched == 'plateau' else config.decay_rate,
            patience_epochs=config.plateau_patience, min_lr=config.min_lr, warmup_epochs=config.warmup_epochs,
            warmup_lr=config.lr * 0.01, plateau_mode='max')
    return scheduler


def scheduler_state(scheduler) -> Dict[str, Any]:
    """The scheduler's state for ``run_state.json``; for plateau also torch's counters (patience,
    cooldown) that timm's ``state_dict`` leaves out."""
    state = {'timm': scheduler.state_dict()}
    inner = getattr(scheduler, 'lr_scheduler', None)
    if inner is not None:
        state['torch'] = inner.state_dict()
    return state


def load_scheduler_state(scheduler, state: Dict[str, Any], epoch: int) -> None:
    """Continue the schedule at ``epoch`` (the first epoch not done).

    Plateau depends on the metrics seen, not on the run's length: its counters are loaded and the
    optimizer keeps the rate its checkpoint restored. Every other timm schedule is a function of the
    epoch and the planned length: as timm's train.py does on resume, the scheduler built for this
    run's ``epochs`` (which may be more than the checkpoint's run planned) is stepped to ``epoch``.
    """
    if 'torch' in state and hasattr(scheduler, 'lr_scheduler'):
        scheduler.load_state_dict(state['timm'])
        scheduler.lr_scheduler.load_state_dict(state['torch'])
        return
    scheduler.step(epoch)
