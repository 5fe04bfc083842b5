"""Classification metrics per head: top-k accuracy, per-class accuracy, confusion matrix.

Every report has one shape: ``{'heads': {'ssa': {...}, 'fe': {...}}, 'output': {...}, 'count': n}``,
where ``output`` is what the model returns in eval mode (the mean of the heads' logits, or the FE
head of a ``no_attention`` model). With test-time flips a ``'tta'`` entry holds ``heads`` and
``output`` of the logits averaged over each image and its mirror.
"""
from typing import Callable, Dict, Iterable, List, Optional

import torch
from accelerate.utils import gather_object, send_to_device

__all__ = ['classification_report', 'evaluate_heads', 'report_top1', 'topk_accuracy']

HeadLogits = Callable[[torch.Tensor], Dict[str, torch.Tensor]]


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Percentage of samples whose label is among the ``k`` highest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1)
    return hits.float().mean().item() * 100


def _entry(z: torch.Tensor, targets: torch.Tensor, per_class: bool) -> Dict:
    entry = {'top1': topk_accuracy(z, targets, 1), 'top5': topk_accuracy(z, targets, 5)}
    if per_class:
        num_classes = z.shape[1]
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        confusion.index_put_((targets, z.argmax(1)), torch.ones_like(targets), accumulate=True)
        support = confusion.sum(1)
        entry['per_class_top1'] = [
            (confusion[c, c] / support[c] * 100).item() if support[c] else None for c in range(num_classes)]
        entry['confusion_matrix'] = confusion.tolist()
    return entry


def classification_report(
        head_logits: Dict[str, torch.Tensor],
        targets: torch.Tensor,
        per_class: bool = False,
) -> Dict:
    """Top-1/top-5 of each head and of the model output (the mean of the heads' logits).

    Args:
        head_logits: ``{'ssa': ..., 'fe': ...}`` (or ``{'fe': ...}``), each ``(N, C)``.
        targets: ``(N,)`` labels.
        per_class: Also report per-class accuracy and the confusion matrix (rows: true class).

    Returns:
        ``{'heads': {name: entry}, 'output': entry, 'count': N}``.
    """
    output = torch.stack(list(head_logits.values())).mean(0)
    return {
        'heads': {name: _entry(z, targets, per_class) for name, z in head_logits.items()},
        'output': _entry(output, targets, per_class),
        'count': int(targets.numel()),
    }


def report_top1(report: Dict) -> float:
    """The top-1 a run is judged by: the model output's, with test-time flips when they were used."""
    return report.get('tta', report)['output']['top1']


def evaluate_heads(
        head_logits: HeadLogits,
        loader: Iterable,
        accelerator,
        per_class: bool = False,
        tta_flip: bool = False,
        per_process: bool = False,
) -> Dict:
    """``classification_report`` over a loader of images, gathered over all processes.

    Args:
        head_logits: Inputs of a batch -> ``{'ssa': ..., 'fe': ...}`` logits (the model in eval mode).
        loader: Batches of ``(inputs, labels)``.
        accelerator: The run's ``accelerate.Accelerator``.
        per_class: Also report per-class accuracy and the confusion matrix.
        tta_flip: Also report the logits averaged over each input and its horizontal mirror.
        per_process: ``loader`` is not prepared by accelerate and yields this process's own share
            (a stream split by ``ssa_timm.data.streams``), in however many batches: its results are
            gathered once, at the end. Otherwise each batch is gathered by ``gather_for_metrics``,
            which drops the padding of a prepared loader.
    """
    logits: Dict[str, list] = {}
    flipped: Dict[str, list] = {}
    targets = []
    with torch.no_grad(), accelerator.autocast():
        for inputs, labels in loader:
            inputs, labels = send_to_device(inputs, accelerator.device), labels.to(accelerator.device)
            heads = head_logits(inputs)
            batch = (heads, labels, head_logits(inputs.flip(-1))) if tta_flip else (heads, labels)
            if not per_process:
                batch = accelerator.gather_for_metrics(batch)
            heads, labels, *mirror = batch
            mirrored: Optional[Dict[str, torch.Tensor]] = mirror[0] if mirror else None
            for name, z in heads.items():
                logits.setdefault(name, []).append(z.float().cpu())
                if mirrored is not None:
                    flipped.setdefault(name, []).append((z.float().cpu() + mirrored[name].float().cpu()) / 2)
            targets.append(labels.cpu())
    parts = [(logits, flipped, targets)]
    if per_process and accelerator.num_processes > 1:
        parts = gather_object(parts)
    target = torch.cat([t for _, _, part in parts for t in part])
    report = classification_report(_concat([p[0] for p in parts]), target, per_class)
    if tta_flip:
        tta = classification_report(_concat([p[1] for p in parts]), target, per_class)
        report['tta'] = {'heads': tta['heads'], 'output': tta['output']}
    return report


def _concat(parts: List[Dict[str, list]]) -> Dict[str, torch.Tensor]:
    """Per-head logits of several processes (some may have had no batch), concatenated in order."""
    names = next((list(part) for part in parts if part), [])
    return {name: torch.cat([z for part in parts for z in part.get(name, [])]) for name in names}
