"""Hub model cards of SSANet weights: YAML metadata (``model-index`` only for measured results) and
a body with the model's details, usage, results and citation, from ``model_cards/template.md``."""
import copy
from typing import Any

import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch.utils.flop_counter import FlopCounterMode

from .hub import label_names
from .models import SSANet, default_qk_norm

__all__ = ['body_weights_repo', 'model_complexity', 'render_model_card', 'reported_top_ks']

_FORMULAS = {
    'plus': 'H = alpha * O + F (Eq. 1)',
    'multiply': 'H = alpha * O * F (Eq. 2)',
    'alpha': 'H = alpha * O',
    'no_alpha': 'H = O',
    'no_attention': 'no SSA module, FE head only',
}
_HEAD_NAMES = {'ssa': 'SSA head', 'fe': 'FE head'}


def reported_top_ks(num_classes: int) -> list[int]:
    """The top-k accuracies worth publishing for ``num_classes`` classes: top-1, and top-5 only when
    there are more than 5 classes (with 5 or fewer it is 100 % by construction)."""
    return [k for k in (1, 5) if k == 1 or k < num_classes]


def model_complexity(model: SSANet, img_size: int) -> dict[str, float]:
    """Parameters (M) and GMACs of one forward pass at ``img_size`` (counted on the meta device)."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    meta = copy.deepcopy(model).to('meta').eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(1, model.in_chans, img_size, img_size, device='meta'))
    return {'params_m': round(params, 2), 'gmacs': round(counter.get_total_flops() / 2e9, 2)}


def body_weights_repo(model: SSANet) -> str | None:
    """The timm Hub repo of the body weights the model's body tag names (its default tag when it names none)."""
    cfg = timm.models.get_pretrained_cfg(model.body_name)
    return cfg.hf_hub_id if cfg is not None else None


def _measured(metrics: dict[str, Any], num_classes: int, dataset: str | None) -> tuple[dict, list[EvalResult]]:
    """The card's results table (each head, and their mean) and its model-index entries, for the
    top-k accuracies ``reported_top_ks`` keeps."""
    top_ks = reported_top_ks(num_classes)
    heads = [dict(name=_HEAD_NAMES[k], **metrics['heads'][k]) for k in ('ssa', 'fe') if k in metrics['heads']]
    if len(heads) > 1:
        heads.append(dict(name='mean of heads (model output)', **metrics['output']))
    eval_results = [
        EvalResult(task_type='image-classification', dataset_type=dataset, dataset_name=dataset,
                   dataset_split='validation', metric_type='accuracy', metric_name=f'top-{k} accuracy',
                   metric_value=round(metrics['output'][f'top{k}'], 2))
        for k in top_ks
    ]
    return {'heads': heads, 'count': metrics.get('count'), 'top_ks': top_ks}, eval_results


def _attention_note(model: SSANet, trained: bool) -> str:
    """Which attention the card's model computes (``qk_norm`` / ``scale_attn``, recorded in its config),
    whether that is its body's default (``default_qk_norm``: the paper's bodies keep the paper's
    attention, every other body takes ``qk_norm``) and, for weights whose SSA module is untrained, how to
    build the other one."""
    attn = model.head.attn
    if attn is None:
        return 'none (`no_attention`: the FE head alone)'
    cosine = default_qk_norm(f'ssanet_{model.body_name.partition(".")[0]}_{model.aggregation}')
    if attn.qk_norm:
        return ('cosine attention, `qk_norm=True`: L2-normalised queries and keys with a learnable temperature '
                '(not in the paper' + ('; the default of the modern names' if cosine else '') + ')'
                + ('' if trained else "; pass `qk_norm=False` for the paper's unscaled dot products"))
    if attn.scale_attn:
        return 'dot products scaled by 1/sqrt(d), `scale_attn=True` (not in the paper)'
    if getattr(attn, 'sagan_qk', False):
        return ("SAGAN's safeguard, `sagan_qk=True`: queries and keys of K/8 channels from spectrally normalised "
                '1x1 convs (Zhang et al. 2019, the paper\'s ref. 28; not in the paper)')
    default = ("the default of the paper's names" if not cosine
               else 'not the default on this body, which is cosine attention')
    return (f"the paper's unscaled dot products `softmax_i(A_i . B_j)` (`qk_norm=False`, `scale_attn=False`; "
            f'{default})' + ('' if trained else '; pass `qk_norm=True` for cosine attention'))


def _zoom_note(model: SSANet) -> str:
    """For a zoom model: that it looks twice, with its settings and its cost."""
    if not model.zoom:
        return ''
    return (f'; **zoom on** (`zoom=True`, threshold {model.zoom_threshold}, margin {model.zoom_margin}, minimum size '
            f'{model.zoom_min_size}): a second pass of the body and heads on the image cropped where the first '
            "pass's attention points, the output the mean of both passes; it costs a second body pass per image "
            '(the GMACs below count both). Measured on the built-in small-part task, it paid on a frozen body with '
            "the attention's alpha starting at 1 and did not when the body was fine-tuned (ssa_timm's docs: "
            'Results, the zoom)')


def _weights_note(dataset: str | None, base_model: str | None, trained: bool) -> str:
    """Where the card's weights come from."""
    if trained:
        return f'The whole model was trained on {dataset}' + (
            f', starting from the ImageNet body weights of `{base_model}`.' if base_model else ', from scratch.')
    return (f'The body starts from the ImageNet weights of `{base_model}`; the SSA module and the heads '
            'are freshly initialised.')


def render_model_card(
        model: SSANet,
        model_name: str,
        template: str,
        img_size: int,
        create_name: str,
        dataset: str | None = None,
        metrics: dict[str, Any] | None = None,
        pretrained_body: bool = True,
) -> ModelCard:
    """Render a Hub model card: YAML metadata (with ``model-index`` only for measured ``metrics``)
    and a body with model details, usage, results and citation.

    Args:
        model: The model the card describes.
        model_name: Card title and model-index name (e.g. the repo id).
        template: Jinja template text (``model_cards/template.md``).
        img_size: Input size of the weights.
        create_name: What ``timm.create_model`` takes to load the weights ('hf-hub:...' or a tag).
        dataset: Dataset the heads were trained on, if any.
        metrics: Validation report (``ssa_timm.metrics.classification_report`` shape) of those weights.
        pretrained_body: Whether the body started from timm's ImageNet weights.
    """
    base_model = body_weights_repo(model) if pretrained_body else None
    results, eval_results = _measured(metrics, model.num_classes, dataset) if metrics else (None, None)
    datasets = [d for d in (('imagenet-1k' if base_model else None), dataset) if d]
    card_data = ModelCardData(
        library_name='timm',
        license=model.pretrained_cfg.get('license') or 'apache-2.0',
        tags=['image-classification', 'timm', 'ssa_timm', 'fine-grained'],
        pipeline_tag='image-classification',
        datasets=datasets or None,
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        architecture=model.pretrained_cfg.get('architecture'),
        body=model.body_name,
        aggregation=model.aggregation,
        aggregation_formula=_FORMULAS[model.aggregation],
        img_size=img_size,
        num_classes=model.num_classes,
        dataset=dataset or 'ImageNet-1k (body only)',
        create_name=create_name,
        create_args='' if metrics else ', num_classes=NUM_CLASSES',
        label_names=bool(label_names(model)),
        top_k=min(5, model.num_classes),
        hub_repo=create_name[len('hf-hub:'):] if create_name.startswith('hf-hub:') else None,
        weights_note=_weights_note(dataset, base_model, trained=bool(metrics)),
        attention_note=_attention_note(model, trained=bool(metrics)) + _zoom_note(model),
        results=results,
        **model_complexity(model, img_size),
    )
