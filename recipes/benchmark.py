"""Benchmarks for ssa_timm: the SSA layer (SDPA vs the plain reference), a train step of SSANet vs
its bare body with a GAP + linear head, a frozen-body training epoch with and without the feature
cache, and the training data pipeline (JPEG decode, resize, flip, normalise, collate) by loader
worker count, next to the images/s of the model's train step.

Cases run interleaved, several repeats each; medians and ratios are reported, as a table on
stdout and as JSON. Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and, on CPU, the
growth of the peak RSS (Linux VmHWM) of a fresh process that runs the case once.

    python recipes/benchmark.py --output benchmark.json
    python recipes/benchmark.py --sections ssa --device cuda
    python recipes/benchmark.py --sections ssa,train --device cuda --amp bf16
    python recipes/benchmark.py --sections cache
    python recipes/benchmark.py --sections zoom --model ssanet_resnet18_plus --img-size 224
    python recipes/benchmark.py --sections data --data-workers 0,1,2
    python recipes/benchmark.py --sections train --model ssanet_vit_small_patch16_224_plus --img-size 448
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn

import ssa_timm
from ssa_timm.feature_cache import HeadsOnCachedFeatures, ZoomInputs
from ssa_timm.cli import HelpFormatter, add_img_size_arg, at_least, comma_separated, deprecated_alias


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--sections', default='ssa,train,cache,data',
                        help='comma separated: ssa, train, zoom, cache, data')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default='none',
                        help='run the ssa and train cases under torch.autocast with this dtype')
    parser.add_argument('--ssa-batch', type=int, default=4)
    parser.add_argument('--ssa-channels', type=int, default=512)
    parser.add_argument('--ssa-sizes', default='14,28,56', help='feature map sides: N = side^2')
    parser.add_argument('--model', default='ssanet_vgg16_plus',
                        help='comma separated ssanet_<timm body>_<aggregation> names for the train section, '
                             'e.g. ssanet_vgg16_plus,ssanet_vit_small_patch16_224_plus (a token body)')
    add_img_size_arg(parser, 'default: %(default)s', default=448)
    parser.add_argument('--body-feature-index', type=int, help="zoom: read the body's map at this "
                        'feature_info index (default: the last map)')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--num-classes', type=int, default=200)
    parser.add_argument('--cache-per-class', type=int, default=5, help='cache: built-in images per class')
    parser.add_argument('--data-images', type=at_least(1), default=128,
                        help='data: JPEG files (500 x 375) to read per epoch')
    parser.add_argument('--data-workers', type=comma_separated(at_least(0)), default=[0, 1, 2],
                        help='data: comma separated loader worker counts')
    parser.add_argument('--data-batch', type=at_least(1), default=32, help='data: loader batch size')
    parser.add_argument('--output', default='benchmark.json', help='the JSON results file')
    deprecated_alias(parser, '--out', '--output')
    parser.add_argument('--peak-rss-case', help=argparse.SUPPRESS)  # internal: measure one case in this process
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(',')) - {'ssa', 'train', 'zoom', 'cache', 'data'}
    if unknown:
        parser.error(f'--sections: {sorted(unknown)} not among ssa, train, zoom, cache, data')
    for name in args.model.split(','):
        try:
            ssa_timm.parse_ssanet_name(name)
        except ValueError as e:
            parser.error(f'--model: {e}')
    return args


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def autocast_step(step: Callable[[], None], device: str, amp: str) -> Callable[[], None]:
    """``step`` run under ``torch.autocast`` with ``amp`` ('bf16' / 'fp16'), or as is for 'none'."""
    if amp == 'none':
        return step
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]

    def autocast() -> None:
        with torch.autocast(torch.device(device).type, dtype=dtype):
            step()
    return autocast


def _peak_memory_mb(case: str, args: tuple, device: torch.device) -> float:
    """Peak memory of one run of a case: CUDA allocator peak, or peak-RSS growth of a fresh process."""
    if device.type == 'cuda':
        step = CASES[case](*args)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    proc = subprocess.run(
        [sys.executable, __file__, '--peak-rss-case', json.dumps([case, *args])],
        capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def _peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM). Unlike ``ru_maxrss`` it starts afresh at exec, not at the
    parent's size at fork."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))


def _rss_growth_mb(case: str, *args) -> float:
    step = CASES[case](*args)
    before = _peak_rss_kib()
    step()
    return (_peak_rss_kib() - before) / 1024


def ssa_case(path: str, batch: int, channels: int, side: int, device: str, amp: str, backward: bool = True):
    """SSA layer through SDPA ('sdpa') or the plain matmul path ('reference'): forward + backward,
    or a no-grad forward (``backward=False``)."""
    torch.manual_seed(0)
    layer = ssa_timm.SpatialSelfAttention(channels, aggregation='plus', fused_attn=path == 'sdpa').to(device)
    x = torch.randn(batch, channels, side, side, device=device, requires_grad=backward)
    forward = layer if path == 'sdpa' else (lambda t: layer.forward_with_attention(t)[0])

    def step() -> None:
        if backward:
            forward(x).sum().backward()
        else:
            with torch.no_grad():
                forward(x)
    return autocast_step(step, device, amp)


def sdpa_kernel(channels: int, side: int, device: torch.device, amp: str) -> str:
    """Name of the attention kernel SDPA dispatched to, read off the profiler."""
    layer = ssa_timm.SpatialSelfAttention(channels, fused_attn=True).to(device)
    x = torch.randn(1, channels, side, side, device=device)
    with torch.profiler.profile() as prof, torch.no_grad():
        autocast_step(lambda: layer(x), str(device), amp)()
    names = {e.key for e in prof.key_averages()}
    kernels = sorted(n for n in names if n.startswith('aten::_scaled_dot_product') or n.startswith('aten::_efficient')
                     or n.startswith('aten::_flash'))
    return ', '.join(kernels) or 'math (composite)'


class BareBody(nn.Module):
    """The SSANet's body with a GAP + linear head: the baseline of the train-step benchmark."""

    def __init__(self, ssanet: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.body = ssanet.body
        self.read_map = ssanet.forward_body  # reads self.body's map as (B, K, H, W), token bodies included
        self.fc = nn.Linear(ssanet.body_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.read_map(x).mean((2, 3)))


def sgd_step(optimizer: torch.optim.Optimizer, forward_backward: Callable[[], None]) -> Callable[[], None]:
    """One optimizer step around ``forward_backward`` (the gradients zeroed first)."""
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()
    return step


def train_case(kind: str, model_name: str, img_size: int, batch: int, num_classes: int, device: str, amp: str,
               body_feature_index=None):
    """One SGD step (forward, loss, backward, update) of the SSANet ('ssanet'), of the SSANet with the zoom
    ('zoom': both passes) or of its bare body ('bare')."""
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet_by_name(model_name, num_classes=num_classes, img_size=img_size,
                                           zoom=kind == 'zoom', body_feature_index=body_feature_index).to(device)
    model.train()
    if kind == 'bare':
        model = BareBody(model, num_classes).to(device).train()
        loss_fn: nn.Module = nn.CrossEntropyLoss()
    else:
        model.set_distilled_training(True)
        loss_fn = ssa_timm.SelfADLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    return sgd_step(optimizer, autocast_step(lambda: loss_fn(model(x), y).backward(), device, amp))


def infer_case(kind: str, model_name: str, img_size: int, batch: int, num_classes: int, device: str, amp: str,
               body_feature_index=None):
    """One eval-mode forward of the SSANet ('ssanet') or of the SSANet with the zoom ('zoom')."""
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet_by_name(model_name, num_classes=num_classes, img_size=img_size,
                                           zoom=kind == 'zoom', body_feature_index=body_feature_index).to(device)
    model.eval()
    x = torch.randn(batch, 3, img_size, img_size, device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x)
    return autocast_step(forward, device, amp)


CASES = {'ssa': ssa_case, 'train': train_case, 'infer': infer_case}


def run_interleaved(cases: Dict[str, Callable[[], None]], repeats: int, device: torch.device) -> Dict[str, List[float]]:
    for step in cases.values():  # warm-up
        _time(step, device)
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, step in cases.items():
            times[name].append(_time(step, device))
    return times


def bench_ssa(args: argparse.Namespace, device: torch.device) -> List[dict]:
    rows = []
    for side in (int(s) for s in args.ssa_sizes.split(',')):
        case_args = {p: (p, args.ssa_batch, args.ssa_channels, side, str(device), args.amp)
                     for p in ('sdpa', 'reference')}
        cases = {f'{p}_{mode}': ssa_case(*a, backward=mode == 'train')
                 for p, a in case_args.items() for mode in ('train', 'infer')}
        median = {k: statistics.median(t) * 1e3 for k, t in run_interleaved(cases, args.repeats, device).items()}
        memory = {p: _peak_memory_mb('ssa', a, device) for p, a in case_args.items()}
        rows.append(dict(
            N=side * side, K=args.ssa_channels, batch=args.ssa_batch,
            sdpa_ms=median['sdpa_train'], reference_ms=median['reference_train'],
            speedup=median['reference_train'] / median['sdpa_train'],
            sdpa_infer_ms=median['sdpa_infer'], reference_infer_ms=median['reference_infer'],
            infer_speedup=median['reference_infer'] / median['sdpa_infer'],
            sdpa_peak_mb=memory['sdpa'], reference_peak_mb=memory['reference'],
            kernel=sdpa_kernel(args.ssa_channels, side, device, args.amp),
        ))
    return rows


def bench_train(args: argparse.Namespace, device: torch.device, model_name: str) -> dict:
    case_args = {k: (k, model_name, args.img_size, args.batch_size, args.num_classes, str(device), args.amp)
                 for k in ('ssanet', 'bare')}
    times = run_interleaved({k: train_case(*a) for k, a in case_args.items()}, args.repeats, device)
    median = {k: statistics.median(t) for k, t in times.items()}
    return dict(
        model=model_name, img_size=args.img_size, batch=args.batch_size,
        ssanet_s=median['ssanet'], bare_s=median['bare'], overhead_pct=(median['ssanet'] / median['bare'] - 1) * 100,
        ssanet_peak_mb=_peak_memory_mb('train', case_args['ssanet'], device),
        bare_peak_mb=_peak_memory_mb('train', case_args['bare'], device),
    )


def frozen_case(kind: str, model_name: str, img_size: int, batch: int, num_classes: int, device: str, amp: str,
                body_feature_index=None):
    """One SGD step of the SSA module and heads on a frozen body, as ``--freeze-body --cache-features`` trains:
    from cached body maps ('ssanet'), or with the zoom from cached maps and the crops through the frozen body
    ('zoom')."""
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet_by_name(model_name, num_classes=num_classes, img_size=img_size,
                                           zoom=kind == 'zoom', body_feature_index=body_feature_index).to(device)
    model.train().body.requires_grad_(False).eval()
    model.set_distilled_training(True)
    heads, loss_fn = HeadsOnCachedFeatures(model), ssa_timm.SelfADLoss()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    with torch.no_grad():
        maps = model.forward_body(x)  # what the cache holds
    inputs = ZoomInputs(maps, x) if kind == 'zoom' else maps
    return sgd_step(optimizer, autocast_step(lambda: loss_fn(heads(inputs), y).backward(), device, amp))


def bench_zoom(args: argparse.Namespace, device: torch.device, model_name: str) -> dict:
    """The zoom's cost, interleaved with and without it: a train step (body trained; body frozen, from the
    feature cache) and an inference forward, in ms and images/s."""
    common = (model_name, args.img_size, args.batch_size, args.num_classes, str(device), args.amp,
              args.body_feature_index)
    makers = {'train': train_case, 'frozen': frozen_case, 'infer': infer_case}
    cases = {f'{kind}_{mode}': make(kind, *common) for kind in ('ssanet', 'zoom') for mode, make in makers.items()}
    median = {k: statistics.median(t) for k, t in run_interleaved(cases, args.repeats, device).items()}
    result = dict(model=model_name, img_size=args.img_size, batch=args.batch_size,
                  body_feature_index=args.body_feature_index)
    for mode in makers:
        plain, zoom = median[f'ssanet_{mode}'], median[f'zoom_{mode}']
        result[mode] = dict(ms=plain * 1e3, zoom_ms=zoom * 1e3, images_per_s=args.batch_size / plain,
                            zoom_images_per_s=args.batch_size / zoom, ratio=zoom / plain)
    return result


def print_zoom(z: dict, repeats: int) -> None:
    """The zoom section's table."""
    print(f'\nThe zoom, {z["model"]} at {z["img_size"]} px, batch {z["batch"]}, median of {repeats}')
    print('| | without zoom ms | with zoom ms | without zoom images/s | with zoom images/s | ratio |')
    print('|---|---|---|---|---|---|')
    for mode, name in (('train', 'train step'), ('frozen', 'train step, frozen body (cache)'), ('infer', 'inference')):
        m = z[mode]
        print(f'| {name} | {m["ms"]:.1f} | {m["zoom_ms"]:.1f} | {m["images_per_s"]:.0f} | '
              f'{m["zoom_images_per_s"]:.0f} | {m["ratio"]:.2f}x |')


def bench_cache(args: argparse.Namespace, device: torch.device) -> dict:
    """One frozen-body epoch of recipes/train.py (its own process) from images vs from the feature cache."""
    import tempfile
    train = Path(__file__).resolve().parent / 'train.py'
    model_name = args.model.split(',')[0]
    common = ['--model', model_name, '--img-size', str(args.img_size), '--epochs', '1', '--freeze-body',
              '--builtin-train-per-class', str(args.cache_per_class), '--builtin-val-per-class', '1',
              '--batch-size', str(args.batch_size), '--workers', '0'] + (['--cpu'] if device.type == 'cpu' else [])
    speed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, extra in (('images', []), ('cache', ['--cache-features'])):
            out = Path(tmp) / kind
            start = time.perf_counter()
            subprocess.run([sys.executable, str(train), *common, *extra, '--output-dir', str(out)], check=True)
            total = time.perf_counter() - start
            epoch = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
            speed[kind] = dict(images_per_s=epoch['images_per_s'], run_s=total)
    return dict(model=model_name, img_size=args.img_size, images=10 * args.cache_per_class,
                images_per_s=speed['images']['images_per_s'], cached_images_per_s=speed['cache']['images_per_s'],
                epoch_speedup=speed['cache']['images_per_s'] / speed['images']['images_per_s'],
                uncached_run_s=speed['images']['run_s'], cached_run_s_with_cache_build=speed['cache']['run_s'])


class TensorDecoded(torch.utils.data.Dataset):
    """The same training pipeline with torchvision's decoder on tensors: ``decode_jpeg``, antialiased
    tensor resize, flip, normalise (the alternative to PIL measured by the data section)."""

    def __init__(self, paths: List[Path], img_size: int, mean, std) -> None:
        self.paths, self.img_size = paths, img_size
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
        from torchvision.transforms.v2.functional import resize
        img = decode_jpeg(read_file(str(self.paths[index])), mode=ImageReadMode.RGB)
        x = resize(img, [self.img_size, self.img_size], antialias=True).float().div_(255)
        x = (x - self.mean) / self.std
        return (x.flip(-1) if index % 2 else x), 0


def write_jpegs(folder: Path, count: int) -> List[Path]:
    """``count`` 500 x 375 JPEGs (quality 90, CUB's typical size) of built-in images scaled up, in an
    ImageFolder layout of two classes."""
    from PIL import Image
    from ssa_timm.data import BuiltinFineGrained
    images = BuiltinFineGrained('train', samples_per_class=-(-count // 10), seed=0)
    paths = []
    for i in range(count):
        path = folder / 'train' / f'class{i % 2}' / f'{i:05d}.jpg'
        path.parent.mkdir(parents=True, exist_ok=True)
        images[i][0].resize((500, 375), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def bench_data(args: argparse.Namespace, device: torch.device, train_images_per_s: float) -> dict:
    """images/s of the training pipeline of recipes/train.py (PIL decode, timm's squash resize, flip,
    normalise, collate) and of the torchvision.io one, per loader worker count, interleaved."""
    import tempfile
    from torch.utils.data import DataLoader
    from ssa_timm.data import EpochFlip, Transformed, build_dataset, model_transform
    model_name = args.model.split(',')[0]
    model = ssa_timm.create_ssanet_by_name(model_name, num_classes=2, img_size=args.img_size)
    transform, _ = model_transform(model, args.img_size)
    cfg = model.pretrained_cfg
    workers = args.data_workers
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.data_images)
        datasets = {'pil': EpochFlip(Transformed(build_dataset('imagefolder', 'train', tmp), transform), seed=0),
                    'tensor': TensorDecoded(paths, args.img_size, cfg['mean'], cfg['std'])}

        def epoch(name: str, w: int) -> Callable[[], None]:
            loader = DataLoader(datasets[name], batch_size=args.data_batch, num_workers=w, shuffle=True,
                                persistent_workers=w > 0)  # steady state: the warm-up epoch starts the workers
            return lambda: sum(len(labels) for _, labels in loader)
        cases = {f'{name}_{w}': epoch(name, w) for w in workers for name in datasets}
        times = run_interleaved(cases, args.repeats, torch.device('cpu'))
    rows = [dict(workers=w, **{f'{name}_images_per_s': args.data_images / statistics.median(times[f'{name}_{w}'])
                               for name in datasets}) for w in workers]
    one_worker = next((r['pil_images_per_s'] for r in rows if r['workers'] == 1), rows[0]['pil_images_per_s'])
    return dict(model=model_name, img_size=args.img_size, images=args.data_images, batch=args.data_batch,
                rows=rows, train_images_per_s=train_images_per_s,
                workers_needed=train_images_per_s / one_worker)


def machine(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.peak_rss_case:
        print(_rss_growth_mb(*json.loads(args.peak_rss_case)))
        return {}
    device = torch.device(args.device)
    sections = args.sections.split(',')
    result = dict(device=machine(device), torch=torch.__version__, repeats=args.repeats, amp=args.amp)
    if 'ssa' in sections:
        result['ssa'] = bench_ssa(args, device)
        print(f'SSA layer, {args.repeats} repeats, median ({result["device"]}, autocast {args.amp}); '
              'peak memory of forward + backward')
        print('| N | K | batch | fwd+bwd SDPA ms | fwd+bwd reference ms | speedup | forward SDPA ms | '
              'forward reference ms | speedup | SDPA peak MB | reference peak MB | SDPA kernel |')
        print('|---|---|---|---|---|---|---|---|---|---|---|---|')
        for r in result['ssa']:
            print(f'| {r["N"]} | {r["K"]} | {r["batch"]} | {r["sdpa_ms"]:.1f} | {r["reference_ms"]:.1f} | '
                  f'{r["speedup"]:.2f}x | {r["sdpa_infer_ms"]:.1f} | {r["reference_infer_ms"]:.1f} | '
                  f'{r["infer_speedup"]:.2f}x | {r["sdpa_peak_mb"]:.0f} | {r["reference_peak_mb"]:.0f} | '
                  f'{r["kernel"]} |')
    if 'train' in sections:
        result['train'] = [bench_train(args, device, name) for name in args.model.split(',')]
        print(f'\nTrain step, SSANet vs its bare body + GAP + linear, {args.img_size} px, batch {args.batch_size}, '
              f'autocast {args.amp}')
        print('| model | SSANet step ms | bare body step ms | overhead | SSANet peak MB | bare peak MB |')
        print('|---|---|---|---|---|---|')
        for t in result['train']:
            print(f'| {t["model"]} | {t["ssanet_s"] * 1e3:.1f} | {t["bare_s"] * 1e3:.1f} | {t["overhead_pct"]:+.1f}% | '
                  f'{t["ssanet_peak_mb"]:.0f} | {t["bare_peak_mb"]:.0f} |')
    if 'zoom' in sections:
        result['zoom'] = bench_zoom(args, device, args.model.split(',')[0])
        print_zoom(result['zoom'], args.repeats)
    if 'cache' in sections:
        c = result['cache'] = bench_cache(args, device)
        print(f'\nFrozen-body training epoch, {c["model"]} at {c["img_size"]} px, {c["images"]} images')
        print('| input | train images/s |\n|---|---|')
        print(f'| images through the frozen body | {c["images_per_s"]:.1f} |')
        print(f'| cached body maps | {c["cached_images_per_s"]:.1f} |')
        print(f'epoch speed-up: {c["epoch_speedup"]:.0f}x (whole run incl. building the cache: '
              f'{c["cached_run_s_with_cache_build"]:.0f} s vs {c["uncached_run_s"]:.0f} s)')
    if 'data' in sections:
        train = result['train'][0] if 'train' in sections else bench_train(args, device, args.model.split(',')[0])
        d = result['data'] = bench_data(args, device, args.batch_size / train['ssanet_s'])
        print(f'\nTraining data pipeline, {d["images"]} JPEGs of 500 x 375 to {d["img_size"]} px, batch {d["batch"]}, '
              f'images/s (median of {args.repeats} epochs)')
        print('| loader workers | PIL (train.py) | torchvision.io.decode_jpeg | ratio |\n|---|---|---|---|')
        for r in d['rows']:
            print(f'| {r["workers"]} | {r["pil_images_per_s"]:.1f} | {r["tensor_images_per_s"]:.1f} | '
                  f'{r["tensor_images_per_s"] / r["pil_images_per_s"]:.2f}x |')
        print(f'{d["model"]} train step ({result["device"]}, batch {args.batch_size}): '
              f'{d["train_images_per_s"]:.3g} images/s, i.e. {d["workers_needed"]:.3g} loader workers\' worth')
    with open(args.output, 'w') as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
