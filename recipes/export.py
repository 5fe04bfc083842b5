"""Export an SSANet for deployment: ONNX (dynamic batch axis, checked against eager with
onnxruntime), TorchScript (timm's scriptable path) and a torch.compile check.

    python recipes/export.py --model runs/builtin/best --onnx model.onnx --torchscript model.pt --compile

The exported graphs compute the eval output: the mean of the SSA and FE heads' logits.
"""
import argparse
import importlib.util
import json
import os
from pathlib import Path
from typing import Dict

import numpy as np
import torch

import timm
from ssa_timm.cli import at_least, positive_float
from ssa_timm.errors import UserError, exit_on_user_error
from ssa_timm.hub import load_model
from ssa_timm.run_dir import atomic_write_text, check_output_file


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='model name, export folder, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('--img-size', type=at_least(1), default=None, help="default: the model's input size")
    p.add_argument('--onnx', default=None, help='write an ONNX model here')
    p.add_argument('--opset', type=at_least(17), default=18)
    p.add_argument('--torchscript', default=None, help='write a TorchScript model here')
    p.add_argument('--compile', action='store_true', help='check torch.compile against eager')
    p.add_argument('--atol', type=positive_float, default=1e-4)
    p.add_argument('--report', default=None, help='also write the JSON report here')
    p.add_argument('--debug', action='store_true', help='show the traceback of user errors')
    args = p.parse_args(argv)
    if not (args.onnx or args.torchscript or args.compile):
        p.error('nothing to do: give --onnx, --torchscript and/or --compile')
    return args


def max_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str, opset: int) -> Dict:
    """ONNX through torch.export with a dynamic batch axis; checked with onnxruntime at two batch sizes."""
    import onnxruntime
    program = torch.onnx.export(
        model, (example,), input_names=['input'], output_names=['logits'], opset_version=opset,
        dynamic_shapes={'x': {0: torch.export.Dim('batch', min=1)}}, dynamo=True, verbose=False)
    program.save(path)
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    diffs = []
    for batch in (1, 3):  # other batch sizes than the traced one: the batch axis is dynamic
        x = torch.randn(batch, *example.shape[1:])
        with torch.no_grad():
            diffs.append(max_abs_diff(session.run(None, {'input': x.numpy()})[0], model(x)))
    return dict(path=path, opset=opset, batch_sizes=[1, 3], max_abs_diff=max(diffs))


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: str, reference: torch.Tensor) -> Dict:
    scripted = torch.jit.script(model)
    scripted.save(path)
    with torch.no_grad():
        diff = max_abs_diff(torch.jit.load(path)(example), reference)
    return dict(path=path, max_abs_diff=diff)


def check_compile(model: torch.nn.Module, example: torch.Tensor, reference: torch.Tensor) -> Dict:
    compiled = torch.compile(model)
    with torch.no_grad():
        diff = max_abs_diff(compiled(example), reference)
    return dict(max_abs_diff=diff)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    for flag in ('onnx', 'torchscript', 'report'):  # before the conversion, not after it
        check_output_file(getattr(args, flag), f'--{flag}')
    if args.onnx:
        for package in ('onnx', 'onnxscript', 'onnxruntime'):
            if importlib.util.find_spec(package) is None:
                raise UserError(f"--onnx needs the {package!r} package: pip install 'ssa-timm[export]'")
    final = {flag: getattr(args, flag) for flag in ('onnx', 'torchscript') if getattr(args, flag)}
    for flag, path in final.items():  # written beside, put in place only once checked against eager
        setattr(args, flag, str(Path(path).with_name(f'.{Path(path).name}.tmp-{os.getpid()}')))
    try:
        return export(args, final)
    finally:
        for flag in final:
            Path(getattr(args, flag)).unlink(missing_ok=True)


def export(args: argparse.Namespace, final: Dict[str, str]) -> Dict:
    """Convert, check against eager, and replace the ``final`` files only when every check passed."""
    with timm.layers.set_layer_config(scriptable=args.torchscript is not None):  # timm's scriptable layers
        model = load_model(args.model).eval()
    size = args.img_size or model.pretrained_cfg['input_size'][-1]
    example = torch.randn(2, model.in_chans, size, size)
    with torch.no_grad():
        reference = model(example)
    report = {'model': args.model, 'img_size': size}
    if args.onnx:
        report['onnx'] = export_onnx(model, example, args.onnx, args.opset)
    if args.torchscript:
        report['torchscript'] = export_torchscript(model, example, args.torchscript, reference)
    if args.compile:
        report['compile'] = check_compile(model, example, reference)
    failed = [k for k in ('onnx', 'torchscript', 'compile') if k in report and report[k]['max_abs_diff'] > args.atol]
    for flag, path in final.items():
        report[flag]['path'] = path
    print(json.dumps(report, indent=1))
    if args.report:
        atomic_write_text(Path(args.report), json.dumps(report, indent=1))
    if failed:
        raise UserError(f'{failed} differ from eager by more than {args.atol}; nothing was written but the report')
    for flag, path in final.items():
        os.replace(getattr(args, flag), path)
    return report


if __name__ == '__main__':
    exit_on_user_error(main)
