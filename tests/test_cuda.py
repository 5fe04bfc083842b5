"""GPU checks: the SSA layer's fused SDPA kernels against the plain reference, SSANet training
under bf16 autocast, and recipes/train.py on one GPU. Skipped where CUDA is not available (CI has
no GPU); run on a GPU machine with ``pytest tests/test_cuda.py``."""
import json

import pytest
import timm
import torch

import ssa_timm
from recipe_runs import TINY_TRAIN, run_python, run_recipe
from test_layers import assert_matches_reference, reference_ssa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.fixture
def exact_fp32():
    """Full fp32 matmuls (no TF32), so the fused kernels can be compared at fp32 tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize('aggregation', ssa_timm.AGGREGATIONS)
def test_sdpa_matches_reference_on_gpu(exact_fp32, aggregation):
    torch.manual_seed(0)
    layer = ssa_timm.SpatialSelfAttention(64, aggregation=aggregation, fused_attn=True).cuda()
    if layer.alpha is not None:
        layer.alpha.data.fill_(0.7)
    x = torch.randn(2, 64, 28, 28, device='cuda', requires_grad=True)
    assert_matches_reference(layer, x, tol=1e-4, grad_atol=1e-3, grad_rtol=1e-3)


def test_bf16_autocast_uses_a_fused_kernel_and_stays_close():
    torch.manual_seed(0)
    layer = ssa_timm.SpatialSelfAttention(128, aggregation='no_alpha', qk_ratio=0.125, scale_attn=True).cuda().eval()
    x = torch.randn(4, 128, 28, 28, device='cuda')
    with torch.no_grad():
        ref = reference_ssa(layer, x)
        with torch.profiler.profile() as prof, torch.autocast('cuda', dtype=torch.bfloat16):
            out = layer(x)
    kernels = {e.key for e in prof.key_averages()}
    fused = ('aten::_flash', 'aten::_efficient', 'aten::_scaled_dot_product_cudnn')
    assert any(k.startswith(fused) for k in kernels), kernels
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_ssanet_gpu_eval_matches_cpu_and_trains_under_bf16(exact_fp32):
    torch.manual_seed(0)
    model = timm.create_model('ssanet', body='resnet18', num_classes=5).eval()
    model.head.attn.alpha.data.fill_(0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)

    model.train().set_distilled_training(True)
    y = torch.tensor([0, 3], device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = ssa_timm.SelfADLoss()(model(x.cuda()), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.head.attn.alpha.grad is not None and model.head.attn.alpha.grad.abs() > 0


def test_self_ad_loss_on_gpu_matches_cpu_without_a_host_sync():
    torch.manual_seed(0)
    z_ssa, z_fe, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 4, 2, 1])
    loss_fn = ssa_timm.SelfADLoss(label_smoothing=0.1)
    expected = loss_fn((z_ssa, z_fe), y)
    torch.cuda.synchronize()
    with torch.profiler.profile() as prof:
        got = loss_fn((z_ssa.cuda(), z_fe.cuda()), y.cuda())
    assert not any(e.key in ('aten::item', 'aten::_local_scalar_dense') for e in prof.key_averages())
    torch.testing.assert_close(got.cpu(), expected)


@pytest.mark.parametrize('label', [3, -1, -100])
def test_out_of_range_gpu_labels_fail_instead_of_being_ignored(label):
    code = ('import torch, ssa_timm; z = torch.randn(2, 3, device="cuda"); '
            f'print(ssa_timm.SelfADLoss()((z, z.clone()), torch.tensor([{label}, 0], device="cuda")).item())')
    proc = run_python('-c', code, check=False)
    assert proc.returncode != 0 and 'device-side assert' in proc.stderr, proc.stdout + proc.stderr[-2000:]


def test_train_recipe_on_one_gpu_with_bf16(tmp_path):
    proc = run_recipe('train.py', *TINY_TRAIN, '--epochs', '2', '--mixed-precision', 'bf16',
                      '--output-dir', str(tmp_path))
    assert 'process 0/1 on cuda' in proc.stdout
    lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [m['epoch'] for m in lines] == [0, 1] and all(m['train_loss'] == m['train_loss'] for m in lines)
    model = timm.create_model(f'local-dir:{tmp_path / "best"}', pretrained=True)
    assert model.num_classes == 10
