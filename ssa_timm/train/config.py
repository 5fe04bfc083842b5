"""The settings of one training run, made once from the recipe's arguments.

``RunConfig`` is frozen: every later step reads the same values. What a run's files record is
derived from it here, in one place each: the run identity a resume must share
(``RunConfig.identity``), the key of the feature cache (``RunConfig.feature_cache_key``) and the
training notes of an export (``RunConfig.export_notes``).
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..data import DATASET_DEFAULTS, dataset_options
from ..models import parse_ssanet_name

__all__ = ['BUILTIN_DEFAULTS', 'IDENTITY_ADDITIONS', 'IDENTITY_RENAMES', 'PAPER_DEFAULTS', 'RESUMABLE_CHANGES',
           'RunConfig', 'identity_changes', 'upgraded_identity']

# Settings left unset (None) take these. The paper fine-tunes ImageNet bodies with SGD at 448 px; the
# built-in dataset trains a small body from scratch at its native 64 px, where AdamW is needed, and
# there a ResNet-18 body is read after layer2 (stride 8), so the attention works on an 8 x 8 map.
BUILTIN_DEFAULTS = dict(model='ssanet_resnet18_plus', img_size=64, opt='adamw', weight_decay=0.05)
PAPER_DEFAULTS = dict(model='ssanet_vgg16_plus', img_size=448, opt='momentum', weight_decay=5e-4)
_BUILTIN_RESNET18_FEATURE_INDEX = 2

# identity fields a resume may change: the schedule is re-planned for a new length
RESUMABLE_CHANGES = ('epochs',)
# identity fields renamed since the previous minor release (new name: old name), so its runs resume
IDENTITY_RENAMES = {'freeze_body': 'freeze_backbone'}  # 0.6
# identity fields added since the previous minor release: the value its runs had (none so far)
IDENTITY_ADDITIONS: Dict[str, Any] = {}
# the attention options of a model, all off: the paper's attention (what a record that names none computed)
_ATTENTION_OFF = {'qk_norm': False, 'scale_attn': False, 'sagan_qk': False}
# settings a checkpoint's optimizer, scheduler and loss depend on (part of the identity)
_TRAINING_SETTINGS = ('opt', 'lr', 'momentum', 'weight_decay', 'body_lr_scale', 'layer_decay', 'sched', 'epochs',
                      'plateau_patience', 'decay_epochs', 'decay_rate', 'warmup_epochs', 'min_lr', 'model_ema',
                      'model_ema_decay', 'loss', 'gamma', 'temperature', 'label_smoothing', 'clip_grad')


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a training run (the recipe's flags, by their ``dest`` names)."""
    # model
    model: Optional[str] = None
    body_feature_index: Optional[int] = None
    img_size: Optional[int] = None
    scale_attn: bool = False
    qk_norm: Optional[bool] = None  # None: the model name's own default (ssa_timm.models.default_qk_norm)
    sagan_qk: bool = False
    alpha_init: float = 0.
    pretrained: Optional[bool] = None
    pretrained_path: Optional[str] = None
    initial_checkpoint: Optional[str] = None
    freeze_body: bool = False
    cache_features: bool = False
    cache_dir: Optional[str] = None  # None: <output_dir>/feature_cache
    zoom: bool = False
    zoom_threshold: float = 0.5
    zoom_margin: float = 0.1
    zoom_min_size: float = 0.25
    # data
    dataset: str = DATASET_DEFAULTS['dataset']
    data_dir: Optional[str] = DATASET_DEFAULTS['data_dir']
    crop_bbox: bool = DATASET_DEFAULTS['crop_bbox']
    builtin_train_per_class: int = DATASET_DEFAULTS['builtin_train_per_class']
    builtin_val_per_class: int = DATASET_DEFAULTS['builtin_val_per_class']
    builtin_family: int = DATASET_DEFAULTS['builtin_family']
    builtin_task: str = DATASET_DEFAULTS['builtin_task']
    builtin_part_cell: Optional[int] = DATASET_DEFAULTS['builtin_part_cell']
    builtin_oracle_crop: bool = DATASET_DEFAULTS['builtin_oracle_crop']
    train_split: str = DATASET_DEFAULTS['train_split']
    val_split: str = DATASET_DEFAULTS['val_split']
    class_map: str = DATASET_DEFAULTS['class_map']
    input_key: Optional[str] = DATASET_DEFAULTS['input_key']
    target_key: Optional[str] = DATASET_DEFAULTS['target_key']
    train_num_samples: Optional[int] = DATASET_DEFAULTS['train_num_samples']
    val_num_samples: Optional[int] = DATASET_DEFAULTS['val_num_samples']
    dataset_download: bool = DATASET_DEFAULTS['dataset_download']
    workers: int = 2
    # loss
    loss: str = 'ad'
    gamma: float = 0.5
    temperature: float = 1.0
    label_smoothing: float = 0.0
    # optimization
    epochs: int = 6
    max_steps: Optional[int] = None
    batch_size: int = 32
    grad_accum: int = 1
    opt: Optional[str] = None
    lr: float = 1e-3
    body_lr_scale: float = 1.0
    layer_decay: Optional[float] = None
    momentum: float = 0.9
    weight_decay: Optional[float] = None
    sched: str = 'plateau'
    plateau_patience: int = 2
    decay_epochs: float = 30
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    min_lr: float = 0.0
    clip_grad: Optional[float] = None
    model_ema: bool = False
    model_ema_decay: float = 0.998
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    tta: str = 'none'
    # run
    seed: int = DATASET_DEFAULTS['seed']
    deterministic: bool = False
    mixed_precision: Optional[str] = None
    output_dir: str = 'runs/builtin'
    overwrite: bool = False
    resume: Optional[str] = None
    keep_checkpoints: int = 2
    checkpoint_steps: Optional[int] = None
    log_with: Optional[Tuple[str, ...]] = None
    cpu: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> 'RunConfig':
        """The config of ``values`` (e.g. ``vars(args)``; keys that are no setting are ignored), with
        the unset defaults that depend on the dataset filled in (``BUILTIN_DEFAULTS`` / ``PAPER_DEFAULTS``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in values.items() if k in names}
        if isinstance(given.get('log_with'), list):
            given['log_with'] = tuple(given['log_with'])
        config = cls(**given)
        builtin = config.dataset == 'builtin'
        defaults = BUILTIN_DEFAULTS if builtin else PAPER_DEFAULTS
        filled = {k: v for k, v in defaults.items() if getattr(config, k) is None}
        if config.pretrained is None:
            filled['pretrained'] = not builtin or config.pretrained_path is not None
        model = filled.get('model', config.model)
        if config.body_feature_index is None and builtin and model.startswith('ssanet_resnet18_'):
            filled['body_feature_index'] = _BUILTIN_RESNET18_FEATURE_INDEX
        return dataclasses.replace(config, **filled)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    @property
    def data_path(self) -> Optional[str]:
        """``data_dir`` as an absolute path (None without one)."""
        return str(Path(self.data_dir).resolve()) if self.data_dir else None

    def model_kwargs(self) -> Dict[str, Any]:
        """SSANet arguments these settings set (and an export's config records): ``qk_norm`` when given
        either way, the other attention options when on."""
        kwargs: Dict[str, Any] = {k: True for k in ('scale_attn', 'sagan_qk') if getattr(self, k)}
        if self.qk_norm is not None:
            kwargs['qk_norm'] = self.qk_norm
        if self.body_feature_index is not None:
            kwargs['body_feature_index'] = self.body_feature_index
        if self.alpha_init:
            kwargs['alpha_init'] = self.alpha_init
        if self.zoom:
            kwargs.update(zoom=True, zoom_threshold=self.zoom_threshold, zoom_margin=self.zoom_margin,
                          zoom_min_size=self.zoom_min_size)
        return kwargs

    def weights_sources(self) -> Dict[str, Any]:
        """Where the starting weights come from (ImageNet body, a body file, a whole SSANet)."""
        return dict(pretrained=self.pretrained, pretrained_path=_absolute(self.pretrained_path),
                    initial_checkpoint=_absolute(self.initial_checkpoint))

    def dataset_options(self, training: bool) -> Dict[str, Any]:
        """``ssa_timm.data.build_dataset``'s arguments for the training or the validation split."""
        return dataset_options(self, training)

    def identity(self, classes: Sequence[str], train_samples: int, val_samples: int, num_processes: int,
                 attention: Optional[Mapping[str, bool]] = None) -> Dict[str, Any]:
        """What a checkpoint must share with the run that resumes it (``RESUMABLE_CHANGES`` aside);
        ``attention``: the attention the built model computes (``ssa_timm.hub.attention_args``), whatever
        the name's default."""
        model_args = {**self.model_kwargs(), **(attention or {})}
        return dict(model=self.model, model_args=model_args, dataset=self.dataset, data_dir=self.data_path,
                    crop_bbox=self.crop_bbox, **self._family(), classes=list(classes), train_samples=train_samples,
                    val_samples=val_samples, img_size=self.img_size, seed=self.seed, **self.weights_sources(),
                    freeze_body=self.freeze_body, cache_features=self.cache_features,
                    batch_size=self.batch_size, grad_accum=self.grad_accum, num_processes=num_processes,
                    **{k: getattr(self, k) for k in _TRAINING_SETTINGS})

    @property
    def cache_path(self) -> Path:
        """The feature cache's folder (``cache_dir``, else ``feature_cache`` in the run folder)."""
        return Path(self.cache_dir) if self.cache_dir else self.output_path / 'feature_cache'

    def feature_cache_key(self, split: str) -> Dict[str, Any]:
        """What the frozen body's maps of ``split`` depend on (the body's weights are added by the cache): the
        body and where it is read, not the aggregation or the attention, so runs that differ only there share
        one cache."""
        return dict(body=_body_of(self.model), body_feature_index=self.body_feature_index, **self.weights_sources(),
                    img_size=self.img_size, dataset=self.dataset, data_dir=self.data_path, crop_bbox=self.crop_bbox,
                    seed=self.seed, builtin=[self.builtin_train_per_class, self.builtin_val_per_class],
                    **self._family(), split=split)

    def _family(self) -> Dict[str, Any]:
        """The built-in glyph family, task, part cell and oracle crop, each recorded only when it is not the
        default (older records stay equal)."""
        task = {'builtin_task': self.builtin_task} if self.builtin_task != 'glyph' else {}
        if self.builtin_part_cell:
            task['builtin_part_cell'] = self.builtin_part_cell
        if self.builtin_oracle_crop:
            task['builtin_oracle_crop'] = True
        return {'builtin_family': self.builtin_family, **task} if self.builtin_family else task

    def with_recorded_attention(self, model_args: Optional[Mapping[str, Any]]) -> 'RunConfig':
        """These settings with the ``qk_norm`` a run being resumed recorded (``model_args`` of its identity,
        read as ``upgraded_identity`` does), unless ``qk_norm`` was given: a resumed run keeps its attention
        when a name's default changed."""
        if self.qk_norm is not None or model_args is None or self.scale_attn or self.sagan_qk:
            return self  # given, or excluded by another option (the identity check names what differs)
        return dataclasses.replace(self, qk_norm=_model_args_upgraded(model_args)['qk_norm'])

    def export_notes(self, epoch: int, ema: bool) -> Dict[str, Any]:
        """The ``training`` entry of an export's ``config.json``."""
        return dict(model=self.model, dataset=self.dataset, **self.weights_sources(), img_size=self.img_size,
                    epoch=epoch, loss=self.loss, freeze_body=self.freeze_body, ema=ema, seed=self.seed)

    def trackers_config(self) -> Dict[str, Any]:
        """The settings as accelerate trackers take them (scalars and strings, no None)."""
        items = dataclasses.asdict(self).items()
        return {k: ','.join(v) if isinstance(v, (list, tuple)) else v for k, v in items if v is not None}


def _body_of(model: Optional[str]) -> Optional[str]:
    """The timm body of an ``ssanet_<body>_<aggregation>`` name (the name itself for anything else)."""
    try:
        return parse_ssanet_name(model)[0]
    except (ValueError, TypeError):
        return model


def _absolute(path: Optional[str]) -> Optional[str]:
    return str(Path(path).resolve()) if path else None


def _model_args_upgraded(model_args: Mapping[str, Any]) -> Dict[str, Any]:
    """Model arguments with every attention option spelled out: one a record leaves out is off (before 0.7
    a run recorded only the options it turned on, and every name computed the paper's attention)."""
    return {**_ATTENTION_OFF, **model_args}


def upgraded_identity(saved: Mapping[str, Any]) -> Dict[str, Any]:
    """An identity recorded by an earlier release, in today's terms: renamed fields under their new name
    (``IDENTITY_RENAMES``), fields added since read as what those runs did (``IDENTITY_ADDITIONS``), the
    attention options spelled out."""
    record = dict(saved)
    for new, old in IDENTITY_RENAMES.items():
        if new not in record and old in record:
            record[new] = record.pop(old)
    for key, value in IDENTITY_ADDITIONS.items():
        record.setdefault(key, value)
    if isinstance(record.get('model_args'), Mapping):
        record['model_args'] = _model_args_upgraded(record['model_args'])
    return record


def identity_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """Identity fields whose values differ between ``saved`` and ``current`` (both read as
    ``upgraded_identity``)."""
    saved, current = upgraded_identity(saved), upgraded_identity(current)
    return [key for key in current if saved.get(key) != current[key]]
