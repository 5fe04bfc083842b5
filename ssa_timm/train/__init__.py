"""The training engine that ``recipes/train.py`` composes: the run's settings (``config``), its
parts (``build``), optimizer and schedule (``optim``), the loop (``loop``), checkpoints
(``checkpoint``), the other files a run writes (``outputs``) and clean stops on a signal
(``preemption``). Every part runs in-process, on one process or under ``accelerate launch``.
The run folder itself (lock, lifecycle) is ``ssa_timm.run_dir``'s; process agreement ``ssa_timm.processes``'."""
from .build import (
    build_datasets, build_loaders, build_model, build_training_data, load_initial_checkpoint, make_accelerator, prepare,
    save_body_weights, seed_everything, set_up_model)
from .checkpoint import CheckpointStore, Progress, recorded_model_args, resume_run
from .config import BUILTIN_DEFAULTS, PAPER_DEFAULTS, RunConfig
from .loop import NonFiniteLoss, Trainee, best_of, train_one_epoch, training_step, validate
from .optim import build_optimizer, build_scheduler, load_scheduler_state, scheduler_state
from .outputs import claim_output_dir, epoch_record, epoch_summary, export_best, tracker_values, write_epoch
from .preemption import RunAborted, StopRequest

__all__ = [
    'BUILTIN_DEFAULTS', 'CheckpointStore', 'NonFiniteLoss', 'PAPER_DEFAULTS', 'Progress', 'RunAborted', 'RunConfig',
    'StopRequest', 'Trainee', 'best_of', 'build_datasets', 'build_loaders', 'build_model', 'build_optimizer',
    'build_scheduler', 'build_training_data', 'claim_output_dir', 'epoch_record', 'epoch_summary', 'export_best',
    'load_initial_checkpoint', 'load_scheduler_state', 'make_accelerator', 'prepare', 'recorded_model_args',
    'resume_run', 'save_body_weights', 'scheduler_state', 'seed_everything', 'set_up_model', 'tracker_values',
    'train_one_epoch', 'training_step', 'validate', 'write_epoch',
]
