"""recipes/train.py's timm building blocks, each checked by its effect: optimizer groups and their
learning rates, the schedule per epoch, EMA weights, channels-last, gradient checkpointing,
gradient clipping, torch.compile (as accelerate applies it), test-time flips, the EMA's selection
and the attention diagnostics; then all of them together in one run (in two processes: tests/e2e)."""
import copy
import json
import math

import pytest
import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3

from recipe_runs import TINY_TRAIN, recipe, run_main
from ssa_timm import SelfADLoss, SpatialSelfAttention
from ssa_timm.diagnostics import attention_diagnostics
from ssa_timm.metrics import evaluate_heads, report_top1
from ssa_timm.train import (
    Trainee, build_datasets, build_loaders, build_model, build_optimizer, build_scheduler, build_training_data,
    set_up_model, training_step)


class Parts:
    """A run's parts, wired as recipes/train.py wires them, without the run folder."""

    def __init__(self, *flags: str) -> None:
        self.config = recipe('train').parse_args([*TINY_TRAIN, '--output-dir', 'unused', *flags])
        self.accelerator = Accelerator(cpu=True, dynamo_backend='inductor' if self.config.compile else None)
        train_images, val_images = build_datasets(self.config)
        self.model = build_model(self.config, len(train_images.classes))
        set_up_model(self.model, self.config)
        train_data, _, trainable = build_training_data(self.config, self.model, train_images, val_images,
                                                       self.accelerator)
        self.train_loader, _ = build_loaders(self.config, self.accelerator, train_data, train_data)
        optimizer = build_optimizer(self.model, self.config)
        self.scheduler = build_scheduler(optimizer, self.config)  # applies each group's lr_scale
        trainable, self.optimizer = self.accelerator.prepare(trainable, optimizer)
        ema = ModelEmaV3(self.model, decay=self.config.model_ema_decay) if self.config.model_ema else None
        self.loss_fn = SelfADLoss()
        self.trainee = Trainee(self.model, trainable, self.optimizer, self.loss_fn, ema)
        self.ema = ema

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return training_step(self.trainee, self.config, self.accelerator, inputs, labels)


def setup_run(*flags: str) -> Parts:
    return Parts(*flags)


def groups_of(run, prefix: str):
    ids = {id(p) for n, p in run.model.named_parameters() if n.startswith(prefix)}
    return [g for g in run.optimizer.param_groups if any(id(p) in ids for p in g['params'])]


def test_optimizer_groups_body_lr_scale_and_no_decay():
    run = setup_run('--lr', '0.01', '--body-lr-scale', '0.1', '--weight-decay', '0.05', '--qk-norm')
    assert type(run.optimizer.optimizer).__name__ == 'AdamW'  # accelerate wraps the timm optimizer
    body, head = groups_of(run, 'body.'), groups_of(run, 'head.')
    assert body and head and not {id(g) for g in body} & {id(g) for g in head}
    assert [g['lr'] for g in body] == pytest.approx([0.001] * len(body))
    assert [g['lr'] for g in head] == pytest.approx([0.01] * len(head))
    params = dict(run.model.named_parameters())
    for name in ('head.attn.alpha', 'head.attn.logit_scale', 'head.fe.fc.bias', 'body.bn1.weight', 'body.conv1.1.bias'):
        group = next(g for g in run.optimizer.param_groups if any(p is params[name] for p in g['params']))
        assert group['weight_decay'] == 0, name
    decayed = next(g for g in run.optimizer.param_groups if any(p is params['head.fe.fc.weight'] for p in g['params']))
    assert decayed['weight_decay'] == 0.05
    frozen = setup_run('--freeze-body')
    assert not groups_of(frozen, 'body.')  # a frozen body has no parameters in the optimizer


def test_layer_decay_and_timm_optimizer_names():
    run = setup_run('--layer-decay', '0.5', '--opt', 'lamb', '--lr', '0.01')
    assert type(run.optimizer.optimizer).__name__ == 'Lamb'
    body_scales = sorted({g['lr_scale'] for g in groups_of(run, 'body.')})
    assert len(body_scales) >= 3 and max(body_scales) < 1  # deeper body layers learn faster, all below the heads
    assert {g['lr_scale'] for g in groups_of(run, 'head.')} == {1.0}
    with pytest.raises(SystemExit) as exit_info:
        recipe('train').parse_args([*TINY_TRAIN, '--opt', 'no_such_opt'])
    assert exit_info.value.code == 2


def lr_per_epoch(*flags: str, metric=lambda epoch: 50.0):
    config = recipe('train').parse_args([*TINY_TRAIN, *flags])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for epoch in range(config.epochs):
        lrs.append(optimizer.param_groups[0]['lr'])
        scheduler.step(epoch + 1, metric(epoch))
    return lrs


def test_schedules_per_epoch():
    cosine = lr_per_epoch('--sched', 'cosine', '--epochs', '5', '--warmup-epochs', '1', '--lr', '0.1',
                          '--min-lr', '0.001')
    assert cosine[0] == pytest.approx(0.001)  # warm-up starts at 1 % of --lr
    assert cosine[1] > cosine[2] > cosine[3] > cosine[4] >= 0.001 and cosine[1] <= 0.1
    step = lr_per_epoch('--sched', 'step', '--epochs', '5', '--decay-epochs', '2', '--decay-rate', '0.5', '--lr', '0.1')
    assert step == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    plateau = lr_per_epoch('--epochs', '6', '--lr', '0.1', '--plateau-patience', '1')  # the paper's default
    assert plateau[:3] == pytest.approx([0.1] * 3) and plateau[3] == pytest.approx(0.03)  # x0.3 after patience
    improving = lr_per_epoch('--epochs', '6', '--lr', '0.1', '--plateau-patience', '1', metric=lambda e: 10.0 * e)
    assert improving == pytest.approx([0.1] * 6)


def test_ema_channels_last_grad_checkpointing_and_clipping(monkeypatch):
    run = setup_run('--model-ema', '--model-ema-decay', '0.5', '--channels-last', '--grad-checkpointing',
                    '--clip-grad', '0.001', '--opt', 'momentum', '--momentum', '0', '--weight-decay', '0',
                    '--lr', '0.1')
    conv = next(m for m in run.model.body.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', lambda *a, **k: calls.append(1) or checkpoint(*a, **k))

    inputs, labels = next(iter(run.train_loader))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.trainee.trainable.train()
    run.step(inputs, labels)
    assert calls  # the body's stages ran under torch.utils.checkpoint
    step = math.sqrt(sum(((p.detach() - before[n]) ** 2).sum() for n, p in run.model.named_parameters()))
    assert 0 < step <= 0.1 * 0.001 * 1.001  # SGD moved by lr x the clipped gradient norm (float32 rounding)

    after_one = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.ema.update(run.model, step=1)  # timm's first EMA update copies the weights
    run.step(inputs, labels)
    run.ema.update(run.model, step=2)  # then decay 0.5: the mean of the two
    ema = dict(run.ema.module.named_parameters())
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(ema[name], (after_one[name] + p.detach()) / 2, msg=name)
    assert any(not torch.equal(ema[n], p) for n, p in run.model.named_parameters())


def test_compiled_training_step_matches_eager():
    parts = Parts('--compile', '--opt', 'sgd', '--lr', '0.1')  # accelerate compiles what it prepares, as in the recipe
    compiled = parts.trainee.trainable.train()
    assert compiled is not parts.model and compiled._orig_mod is parts.model
    eager = copy.deepcopy(parts.model).train()
    inputs, labels = next(iter(parts.train_loader))
    loss_eager = parts.loss_fn(eager(inputs), labels)
    loss_compiled = parts.loss_fn(compiled(inputs), labels)
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-4, atol=1e-5)
    grads = dict(parts.model.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_the_ema_is_exported_when_it_validates_better(monkeypatch):
    from ssa_timm.train import loop
    parts = Parts('--model-ema')
    scores = {id(parts.model): 40.0, id(parts.ema.module): 60.0}
    monkeypatch.setattr(loop, 'validate', lambda model, *a: {'output': {'top1': scores[id(model)]}})
    report, (top1, best, best_report, is_ema) = loop.best_of(parts.trainee, parts.config, parts.accelerator, [], None)
    assert best is parts.ema.module and is_ema and top1 == 60 and report['ema'] is best_report
    scores[id(parts.ema.module)] = 40.0  # a tie keeps the model
    _, (_, best, _, is_ema) = loop.best_of(parts.trainee, parts.config, parts.accelerator, [], None)
    assert best is parts.model and not is_ema


def test_tta_flip_averages_each_image_and_its_mirror():
    # 1 x 2 px images [left, right]; class 0 scores the left pixel, class 1 a constant 0: the plain logits
    # and the mean over each image and its mirror ((left + right) / 2 against 0) disagree on every image
    images = torch.tensor([[1.0, -3.0], [-1.0, 3.0], [2.0, -5.0]]).reshape(3, 1, 1, 2)
    labels = torch.tensor([1, 0, 1])
    head_logits = lambda x: {'fe': torch.stack([x[:, 0, 0, 0], torch.zeros(len(x))], 1)}  # noqa: E731
    loader = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    report = evaluate_heads(head_logits, loader, Accelerator(cpu=True), tta_flip=True)
    assert report['heads']['fe']['top1'] == 0 and report['tta']['heads']['fe']['top1'] == pytest.approx(100)
    assert report_top1(report) == pytest.approx(100) and report['count'] == 3


def test_attention_diagnostics_read_uniform_and_one_hot_rows():
    attn = SpatialSelfAttention(8, aggregation='plus')
    body_map = torch.randn(2, 8, 3, 3)
    for conv in (attn.conv_a, attn.conv_b):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    uniform = attention_diagnostics(attn, body_map)
    assert uniform['entropy_ratio'] == pytest.approx(1.0) and uniform['row_max'] == pytest.approx(1 / 9)
    assert uniform['logit_std'] == 0 and uniform['alpha'] == 0 and uniform['positions'] == 9
    torch.nn.init.normal_(attn.conv_a.weight, std=100.)
    attn.conv_b.weight.data.copy_(attn.conv_a.weight)
    peaked = attention_diagnostics(attn, body_map)
    assert peaked['entropy_ratio'] < 0.05 and peaked['row_max'] > 0.95 and peaked['logit_std'] > 100


ALL_FLAGS = ['--model-ema', '--clip-grad', '1.0', '--channels-last', '--grad-checkpointing', '--tta', 'flip',
         '--sched', 'cosine', '--warmup-epochs', '1', '--body-lr-scale', '0.1', '--layer-decay', '0.8']


def test_all_flags_in_a_run(tmp_path):
    assert run_main('train', *TINY_TRAIN, '--epochs', '2', *ALL_FLAGS, '--output-dir', str(tmp_path)) == 0
    lines = [json.loads(x) for x in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert_all_flags_run(tmp_path, lines)


def assert_all_flags_run(out, lines) -> None:
    """What a run with ``ALL_FLAGS`` writes: flip and EMA reports every epoch, the warm-up rate, the EMA
    exported exactly when it validated better than the model at the exported epoch, its weights saved."""
    assert len(lines) == 2
    for line in lines:
        val = line['val']
        assert val['count'] == 50 and set(val['tta']) == {'heads', 'output'}
        assert set(val['ema']['heads']) == {'ssa', 'fe'} and 'attention' in val['ema']
    assert lines[0]['lr'] == pytest.approx(1e-5)  # the warm-up epoch starts at 1 % of --lr (the heads' rate)
    training = json.loads((out / 'best' / 'config.json').read_text())['training']
    exported = lines[training['epoch']]['val']
    assert training['ema'] == (report_top1(exported['ema']) > report_top1(exported))
    assert (out / 'checkpoints' / 'checkpoint_1' / 'ema.safetensors').is_file()
