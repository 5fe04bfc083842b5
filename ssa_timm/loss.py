"""Self-attention distillation loss (Self-AD), paper section 3.3, Eqs. 3-5.

``L = CE(y, z_ssa) + T^2 * KL(softmax(z_ssa / T) || softmax(z_fe / T)) + gamma * CE(y, z_ssa)``

The SSA head is the teacher and the feature-extractor (FE) head the student.
"""
import math
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['SelfADLoss']

Logits = Union[torch.Tensor, Sequence[torch.Tensor], List[Sequence[torch.Tensor]]]


class SelfADLoss(nn.Module):
    """Self-AD loss on the two heads' logits, or plain CE for a single-head model.

    ``mode='ad'`` is the paper's Eq. 5. ``mode='ce'`` is the Table 3 baseline
    ``CE(y, z_ssa) + CE(y, z_fe)``. Given one logits tensor (an ``no_attention`` model, or a model
    in eval mode) the loss is plain CE.
    """

    def __init__(
            self,
            gamma: float = 0.5,
            temperature: float = 1.0,
            detach_teacher: bool = True,
            mode: str = 'ad',
            label_smoothing: float = 0.0,
    ) -> None:
        """
        Args:
            gamma: Weight of the extra CE term of Eq. 4 (paper: 0.5).
            temperature: Softmax temperature T of the KL term; the term is scaled by T^2.
            detach_teacher: Stop the KL gradient from reaching the SSA (teacher) logits.
            mode: 'ad' (Self-AD, Eq. 5) or 'ce' (CE on both heads).
            label_smoothing: Label smoothing of every CE term.
        """
        super().__init__()
        if mode not in ('ad', 'ce'):
            raise ValueError(f"mode must be 'ad' or 'ce', got {mode!r}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f'temperature must be a finite number > 0, got {temperature}')
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f'gamma must be a finite number >= 0, got {gamma}')
        if not 0 <= label_smoothing < 1:
            raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
        self.gamma = gamma
        self.temperature = temperature
        self.detach_teacher = detach_teacher
        self.mode = mode
        self.label_smoothing = label_smoothing

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def distillation(self, z_ssa: torch.Tensor, z_fe: torch.Tensor) -> torch.Tensor:
        """``T^2 * KL(softmax(z_ssa / T) || softmax(z_fe / T))``, averaged over the batch."""
        t = self.temperature
        teacher = z_ssa.detach() if self.detach_teacher else z_ssa
        return F.kl_div(
            F.log_softmax(z_fe / t, dim=-1),
            F.log_softmax(teacher / t, dim=-1),
            reduction='batchmean',
            log_target=True,
        ) * t * t

    def forward(self, logits: Logits, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: ``(z_ssa, z_fe)``, each ``(B, num_classes)``, or one ``(B, num_classes)`` tensor; a list of
                those (one per pass of a ``zoom`` model) gives the mean of their losses.
            target: Class indices ``(B,)`` in ``[0, num_classes)``. Labels outside it raise a
                ValueError on CPU; on an accelerator they trip cross_entropy's device-side check
                (see ``_checked_target``).
        """
        if isinstance(logits, list):  # one (z_ssa, z_fe) per pass of a zoom model: both passes learn
            return sum(self(pass_logits, target) for pass_logits in logits) / len(logits)
        heads = _split_heads(logits)
        target = _checked_target(heads[0], target)
        if len(heads) == 1:
            return self._ce(heads[0], target)
        z_ssa, z_fe = heads
        ce_ssa = self._ce(z_ssa, target)
        if self.mode == 'ce':
            return ce_ssa + self._ce(z_fe, target)
        return ce_ssa + self.distillation(z_ssa, z_fe) + self.gamma * ce_ssa


def _split_heads(logits: Logits) -> Tuple[torch.Tensor, ...]:
    heads = (logits,) if isinstance(logits, torch.Tensor) else tuple(logits)
    if len(heads) not in (1, 2):
        raise ValueError(f'expected one logits tensor or a pair (z_ssa, z_fe), got {len(heads)} tensors')
    for z in heads:
        if not isinstance(z, torch.Tensor) or z.ndim != 2:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f'expected logits of shape (batch, num_classes), got {shape}')
    if len(heads) == 2 and heads[0].shape != heads[1].shape:
        raise ValueError(
            f'z_ssa and z_fe must have the same shape, got {tuple(heads[0].shape)} and {tuple(heads[1].shape)}')
    return heads


def _checked_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Validate class-index targets for ``logits``; return the target the CE terms should use.

    The label range is checked on the host only for CPU targets: for an accelerator's, reading
    min/max would synchronise every training step (about 5 % of a batch-32 step on an H200).
    There, labels out of range are mapped to ``num_classes`` instead, which cross_entropy's
    device-side check rejects ("t >= 0 && t < n_classes"), so no label, -100 (its default
    ignore_index) included, is ever dropped silently.
    """
    batch, num_classes = logits.shape
    if target.dtype != torch.long:
        raise ValueError(f'expected class indices of dtype torch.long as target, got {target.dtype}')
    if target.shape != (batch,):
        raise ValueError(
            f'expected target of shape ({batch},) for logits {tuple(logits.shape)}, got {tuple(target.shape)}')
    valid = (target >= 0) & (target < num_classes)
    if target.device.type != 'cpu':
        return target.where(valid, num_classes)
    if not bool(valid.all()):
        raise ValueError(
            f'labels must be in [0, {num_classes}), got min {int(target.min())} and max {int(target.max())}')
    return target
