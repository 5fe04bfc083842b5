"""Publish a model exported by recipes/train.py to the Hugging Face Hub.

Uploads ``config.json`` (architecture, num_classes, label names, pretrained_cfg, model_args),
``model.safetensors`` (metadata ``{"format": "pt"}``) and a ``README.md`` model card rendered from
``model_cards/template.md`` with the metrics the training run measured. The uploaded config loads in
timm and in transformers (``model_args`` without ``num_classes``, see ``ssa_timm.hub.fixed_config``).

    python recipes/push_to_hub.py --checkpoint runs/cub/best --repo-id someone/ssanet_vgg16_plus.cub_448
    python recipes/push_to_hub.py --checkpoint runs/builtin/best --repo-id someone/x --dry-run out/
    python recipes/push_to_hub.py --checkpoint old_export/ --fix-config   # rewrite an older export in place

Loading it back: ``import ssa_timm, timm; timm.create_model('hf-hub:someone/...', pretrained=True)``, or
with transformers: ``import ssa_timm; from transformers import pipeline;
pipeline('image-classification', model='someone/...')``. With ``HF_HUB_OFFLINE`` set only
``--dry-run`` and ``--fix-config`` work.
"""
import argparse
import json
import tempfile
from pathlib import Path
from typing import Optional

from huggingface_hub import constants, create_branch, create_repo, upload_folder
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open
from safetensors.torch import save_file

from ssa_timm.errors import UserError, exit_on_user_error
from ssa_timm.hub import fix_config, fixed_config, load_model, validate_config
from ssa_timm.model_card import render_model_card
from ssa_timm.output_paths import check_output_path

TEMPLATE = Path(__file__).resolve().parents[1] / 'model_cards' / 'template.md'


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='export folder (config.json + model.safetensors)')
    p.add_argument('--repo-id', type=repo_id, default=None, help='ORG/NAME (required unless only --fix-config)')
    p.add_argument('--private', action='store_true')
    p.add_argument('--revision', default=None, help='branch to push to (created if missing)')
    p.add_argument('--token', default=None, help='default: the logged-in token / HF_TOKEN')
    p.add_argument('--commit-message', default='Add SSANet weights')
    p.add_argument('--dry-run', metavar='OUT', default=None, help='write the folder that would be uploaded to OUT')
    p.add_argument('--fix-config', action='store_true',
                   help="rewrite the checkpoint's config.json in place so transformers loads it (exports before 0.5)")
    p.add_argument('--debug', action='store_true', help='show the traceback of user errors')
    args = p.parse_args(argv)
    if args.repo_id is None and not args.fix_config:
        p.error('--repo-id is required (unless only --fix-config is given)')
    return args


def repo_id(text: str) -> str:
    """A ``--repo-id``: a valid Hub repo id of the form 'ORG/NAME' (an argparse type: exit status 2)."""
    try:
        validate_repo_id(text)
    except HFValidationError as e:
        raise argparse.ArgumentTypeError(f'{text!r} is not a valid Hub repo id: {e}') from None
    if text.count('/') != 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 'ORG/NAME'")
    return text


def read_checkpoint(folder: Path) -> dict:
    """The export's config, after checking it has weights, a valid config (``validate_config``) and label names."""
    config_path, weights = folder / 'config.json', folder / 'model.safetensors'
    if not folder.is_dir():
        raise FileNotFoundError(f'--checkpoint {folder} is not a folder')
    for path, what in ((config_path, 'config'), (weights, 'weights')):
        if not path.is_file():
            raise FileNotFoundError(f'--checkpoint {folder} has no {what} ({path.name}); '
                                    'export one with recipes/train.py')
    try:
        config = validate_config(json.loads(config_path.read_text()), str(config_path))
    except ValueError as e:
        raise UserError(f'{config_path} is not valid JSON ({e})') from e
    if not config.get('label_names'):
        raise UserError(f'{config_path} has no label_names; the Hub model would predict nameless classes')
    return config


def build_folder(checkpoint: Path, repo_id: str, out: Path) -> Path:
    """Write config.json, model.safetensors (with ``{"format": "pt"}``) and README.md to ``out``."""
    config = read_checkpoint(checkpoint)
    model = load_model(str(checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    (out / 'config.json').write_text(json.dumps(fixed_config(config), indent=2) + '\n')
    with safe_open(checkpoint / 'model.safetensors', framework='pt') as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, out / 'model.safetensors', metadata={'format': 'pt'})
    training = config.get('training', {})
    card = render_model_card(
        model, repo_id, TEMPLATE.read_text(), img_size=model.pretrained_cfg['input_size'][-1],
        create_name=f'hf-hub:{repo_id}', dataset=training.get('dataset'), metrics=config.get('metrics'),
        pretrained_body=bool(training.get('pretrained')))
    card.save(out / 'README.md')
    return out


def push(folder: Path, repo_id: str, private: bool, revision: Optional[str], token: Optional[str], message: str) -> str:
    """Create the repo (and branch) if needed and upload ``folder``; Hub errors are one line."""
    try:
        create_repo(repo_id, private=private, token=token, exist_ok=True)
        if revision:
            create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        info = upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, token=token,
                             commit_message=message)
    except OfflineModeIsEnabled as e:
        raise UserError(f'cannot push to {repo_id}: HF_HUB_OFFLINE is set ({e})') from e
    except HfHubHTTPError as e:
        raise UserError(f'cannot push to {repo_id}: {e}') from e
    return str(info)


def check_online(repo_id: str) -> None:
    """Refuse an upload up front when huggingface_hub is in offline mode."""
    if constants.is_offline_mode():
        raise UserError(f'cannot push to {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, '
                        'or write the folder that would be uploaded with --dry-run OUT')


def main(argv=None) -> Path:
    args = parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if args.fix_config:
        read_checkpoint(checkpoint)
        changed = fix_config(checkpoint)
        print(f'{checkpoint / "config.json"}: ' + ('rewritten; it loads in timm and transformers' if changed else
                                                   'already loads in timm and transformers, left as it is'))
        if args.repo_id is None:
            return checkpoint
    if args.dry_run:
        check_output_path(args.dry_run, '--dry-run', model_folders=[checkpoint], is_folder=True)
        out = build_folder(checkpoint, args.repo_id, Path(args.dry_run))
        print(f'wrote {sorted(p.name for p in out.iterdir())} to {out}')
        return out
    check_online(args.repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(checkpoint, args.repo_id, Path(tmp))
        url = push(folder, args.repo_id, args.private, args.revision, args.token, args.commit_message)
    print(f'pushed {args.checkpoint} to {args.repo_id}: {url}')
    print(f"load it with: import ssa_timm, timm; timm.create_model('hf-hub:{args.repo_id}', pretrained=True)")
    return checkpoint


if __name__ == '__main__':
    exit_on_user_error(main)
