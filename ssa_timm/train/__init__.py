"""The training engine that ``recipes/train.py`` composes: the run's settings (``config``), its
parts (``build``), optimizer and schedule (``optim``), the loop (``loop``), checkpoints
(``checkpoint``), the other files a run writes (``outputs``) and clean stops on a signal
(``preemption``). Every part runs in-process, on one process or under ``accelerate launch``."""
from .build import (
    build_datasets, build_loaders, build_model, build_training_data, load_initial_checkpoint, make_accelerator, prepare,
    save_body_weights, seed_everything, set_up_model)
from .checkpoint import CheckpointError, CheckpointStore, Progress
from .config import RunConfig
from .loop import NonFiniteLoss, Trainee, best_of, train_one_epoch, training_step, validate
from .optim import build_optimizer, build_scheduler, load_scheduler_state, scheduler_state
from .outputs import append_metrics, claim_output_dir, export_best, keep_metrics_before, run_on_main
from .preemption import RunAborted, StopRequest

__all__ = [
    'CheckpointError', 'CheckpointStore', 'NonFiniteLoss', 'Progress', 'RunAborted', 'RunConfig', 'StopRequest',
    'Trainee', 'append_metrics', 'best_of', 'build_datasets', 'build_loaders', 'build_model', 'build_optimizer',
    'build_scheduler', 'build_training_data', 'claim_output_dir', 'export_best', 'keep_metrics_before',
    'load_initial_checkpoint', 'load_scheduler_state', 'make_accelerator', 'prepare', 'run_on_main',
    'save_body_weights', 'scheduler_state', 'seed_everything', 'set_up_model', 'train_one_epoch', 'training_step',
    'validate',
]
