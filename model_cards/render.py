"""Render the model card of every registered pretrained tag into this folder.

    python model_cards/render.py            # writes model_cards/<name>.<tag>.md
    python model_cards/render.py --check    # fails if a card differs from its rendering

Cards of fine-tuned weights are rendered by ``recipes/push_to_hub.py`` from the training run's
measured metrics; these cards describe the ImageNet-body tags, which have no measured results.
"""
import argparse
import sys
from pathlib import Path

import timm

import ssa_timm  # noqa: F401  (registers the models)
from ssa_timm.model_card import render_model_card

HERE = Path(__file__).resolve().parent


def render_all() -> dict:
    template = (HERE / 'template.md').read_text()
    cards = {}
    for tagged in timm.list_models('ssanet_*', pretrained=True, include_tags=True):
        model = timm.create_model(tagged, device='meta')
        img_size = model.pretrained_cfg['input_size'][-1]
        cards[f'{tagged}.md'] = str(render_model_card(model, tagged, template, img_size, tagged)) + '\n'
    return cards


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--check', action='store_true', help='compare instead of writing')
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = HERE / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f'stale or missing cards (run python model_cards/render.py): {stale}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
