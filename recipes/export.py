"""Export an SSANet for deployment: ONNX (dynamic batch axis, checked against eager with
onnxruntime), TorchScript (timm's scriptable path) and a torch.compile check.

    python recipes/export.py --model runs/builtin/best --onnx model.onnx --torchscript model.pt --compile

The exported graphs compute the eval output: the mean of the SSA and FE heads' logits. Every output
path is checked before the conversion (writable, not inside the model's folder); the files are written
beside their final name and put in place only when every check passed, and a failed write (a full
disk) is one line that leaves no temporary file.
"""
import argparse
import importlib.util
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import torch

import timm
from ssa_timm.cli import HelpFormatter, add_img_size_arg, at_least, positive_float
from ssa_timm.errors import UserError, exit_on_user_error
from ssa_timm.hub import load_model, model_folder
from ssa_timm.output_paths import check_output_path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--model', required=True, help='model name, export folder, local-dir:PATH or hf-hub:ORG/NAME')
    add_img_size_arg(p)
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
    outputs = [getattr(args, flag) for flag in ('onnx', 'torchscript', 'report') if getattr(args, flag)]
    if len(set(Path(path).resolve() for path in outputs)) < len(outputs):
        p.error(f'--onnx, --torchscript and --report must be different files, got {outputs}')
    return args


def max_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn a failed write into one line naming ``what`` (torch.jit.save reports one as RuntimeError)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        raise UserError(f'cannot write {what}: {getattr(e, "strerror", None) or e}') from e


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str, opset: int, what: str = '') -> Dict:
    """ONNX through torch.export with a dynamic batch axis; checked with onnxruntime at two batch sizes.
    ``what`` names the output in the message of a failed write."""
    import onnxruntime
    program = torch.onnx.export(
        model, (example,), input_names=['input'], output_names=['logits'], opset_version=opset,
        dynamic_shapes={'x': {0: torch.export.Dim('batch', min=1)}}, dynamo=True, verbose=False)
    with writing(what or path):
        program.save(path)
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    diffs = []
    for batch in (1, 3):  # other batch sizes than the traced one: the batch axis is dynamic
        x = torch.randn(batch, *example.shape[1:])
        with torch.no_grad():
            diffs.append(max_abs_diff(session.run(None, {'input': x.numpy()})[0], model(x)))
    return dict(path=path, opset=opset, batch_sizes=[1, 3], max_abs_diff=max(diffs))


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: str, reference: torch.Tensor,
                       what: str = '') -> Dict:
    """TorchScript through timm's scriptable layers, checked against eager; ``what`` names the output
    in the message of a failed write."""
    scripted = torch.jit.script(model)
    with writing(what or path):
        torch.jit.save(scripted, path)
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
    folder = model_folder(args.model)
    for flag in ('onnx', 'torchscript', 'report'):  # before the conversion, not after it
        check_output_path(getattr(args, flag), f'--{flag}', model_folders=[folder] if folder else [])
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


def write_report(path: Path, report: Dict) -> None:
    """``report`` as JSON at ``path`` through a temporary sibling and a rename; a failed write is one
    line and leaves no temporary file."""
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        with writing(f'--report {path}'):
            tmp.write_text(json.dumps(report, indent=1))
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        report['onnx'] = export_onnx(model, example, args.onnx, args.opset, f'--onnx {final["onnx"]}')
    if args.torchscript:
        report['torchscript'] = export_torchscript(model, example, args.torchscript, reference,
                                                   f'--torchscript {final["torchscript"]}')
    if args.compile:
        report['compile'] = check_compile(model, example, reference)
    failed = [k for k in ('onnx', 'torchscript', 'compile') if k in report and report[k]['max_abs_diff'] > args.atol]
    for flag, path in final.items():
        report[flag]['path'] = path
    print(json.dumps(report, indent=1))
    if args.report:
        write_report(Path(args.report), report)
    if failed:
        raise UserError(f'{failed} differ from eager by more than {args.atol}; nothing was written but the report')
    for flag, path in final.items():
        os.replace(getattr(args, flag), path)
    return report


if __name__ == '__main__':
    exit_on_user_error(main)
