"""Classification metrics per head: top-k accuracy, per-class accuracy, confusion matrix."""
from typing import Callable, Dict, Iterable

import torch

__all__ = ['classification_report', 'evaluate_heads', 'topk_accuracy']


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Percentage of samples whose label is among the ``k`` highest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1)
    return hits.float().mean().item() * 100


def classification_report(
        head_logits: Dict[str, torch.Tensor],
        targets: torch.Tensor,
        per_class: bool = False,
) -> Dict[str, Dict]:
    """Top-1/top-5 of each head and of their mean (the model's eval output).

    Args:
        head_logits: ``{'ssa': ..., 'fe': ...}`` (or ``{'fe': ...}``), each ``(N, C)``.
        targets: ``(N,)`` labels.
        per_class: Also report per-class accuracy and the confusion matrix (rows: true class).
    """
    logits = dict(head_logits)
    if len(logits) > 1:
        logits['mean'] = torch.stack(list(head_logits.values())).mean(0)
    report: Dict[str, Dict] = {}
    for name, z in logits.items():
        entry = {'top1': topk_accuracy(z, targets, 1), 'top5': topk_accuracy(z, targets, 5)}
        if per_class:
            num_classes = z.shape[1]
            confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
            confusion.index_put_((targets, z.argmax(1)), torch.ones_like(targets), accumulate=True)
            support = confusion.sum(1)
            entry['per_class_top1'] = [
                (confusion[c, c] / support[c] * 100).item() if support[c] else None for c in range(num_classes)]
            entry['confusion_matrix'] = confusion.tolist()
        report[name] = entry
    report['count'] = int(targets.numel())
    return report


def evaluate_heads(
        head_logits: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
        loader: Iterable,
        accelerator,
        per_class: bool = False,
) -> Dict[str, Dict]:
    """``classification_report`` over a (prepared) loader, gathered over all processes.

    Args:
        head_logits: Inputs of a batch -> ``{'ssa': ..., 'fe': ...}`` logits (the model in eval mode).
        loader: Batches of ``(inputs, labels)``.
        accelerator: The run's ``accelerate.Accelerator``; ``gather_for_metrics`` drops its padding.
        per_class: Also report per-class accuracy and the confusion matrix.
    """
    logits, targets = {}, []
    with torch.no_grad(), accelerator.autocast():
        for inputs, labels in loader:
            heads, labels = accelerator.gather_for_metrics((head_logits(inputs), labels))
            for name, z in heads.items():
                logits.setdefault(name, []).append(z.float().cpu())
            targets.append(labels.cpu())
    return classification_report({k: torch.cat(v) for k, v in logits.items()}, torch.cat(targets), per_class)
