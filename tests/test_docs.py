"""The documentation stays true (README.md, docs/, mkdocs.yml; ``mkdocs build --strict`` runs in CI).

- The README's quickstart runs: its commands in this process (the built-in run on the tiny settings of
  the other tests, a CUB command parsed only, the upload as a dry run placed in an offline Hugging Face
  cache), then its Python blocks as written, in one namespace, offline.
- Every flag that a recipe command in README.md or docs/ passes exists in that recipe's parser, and so
  does every flag in the flag tables of the Training and Datasets pages.
- The registered-names tables list exactly the names timm knows.
- README.md, the Getting started page and .ci/run give the same test command.
- The README's links resolve, anchors included.
- No working notes: ``grep -rn "issue [0-9]\\|lent\\|this session" README.md docs/`` finds nothing.
"""
import argparse
import contextlib
import re
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path
from unittest import mock

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
from recipe_runs import ROOT, TINY_TRAIN, recipe, run_main
from PIL import Image

README = ROOT / 'README.md'
DOCS = ROOT / 'docs'
PAGES = sorted(DOCS.rglob('*.md'))
FENCE = re.compile(r'^( *)```(\w*)\n(.*?)^\1```', re.M | re.S)
SHELL_OPERATORS = {'||', '&&', '|', ';', '>', '<', '2>'}


def fenced(text: str, lang: str) -> list[str]:
    """The bodies of the ``lang`` code blocks of a Markdown text, dedented."""
    return [textwrap.dedent(body) for _, found, body in FENCE.findall(text) if found == lang]


def section(text: str, heading: str) -> str:
    """A ``## heading`` section of a Markdown text, up to the next ``## ``."""
    start = text.index(f'\n## {heading}\n')
    end = text.find('\n## ', start + 1)
    return text[start:end if end >= 0 else None]


def commands(block: str) -> list[list[str]]:
    """The commands of a bash block, each as its words (continuation lines and quotes over several lines
    joined, comments dropped)."""
    found, pending = [], ''
    for line in block.replace('\\\n', ' ').splitlines():
        pending += line + '\n'
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote goes on on the next line
            continue
        found += [words] if words else []
        pending = ''
    assert not pending, f'unclosed quote in {pending!r}'
    return found


def recipe_call(words: list[str]) -> tuple[str, list[str]] | None:
    """``(recipe name, its arguments)`` of a command that runs ``recipes/<name>.py``, else None."""
    for i, word in enumerate(words):
        found = re.fullmatch(r'recipes/(\w+)\.py', word)
        if found:
            args = words[i + 1:]
            ends = [j for j, a in enumerate(args) if a in SHELL_OPERATORS]
            return found.group(1), args[:ends[0]] if ends else args
    return None


class _Captured(Exception):
    pass


def parser_of(name: str) -> argparse.ArgumentParser:
    """The argument parser ``recipes/<name>.py``'s ``parse_args`` builds (caught before it parses)."""
    captured = []

    def capture(self, *args, **kwargs):
        captured.append(self)
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, 'parse_known_args', capture), contextlib.suppress(_Captured):
        recipe(name).parse_args([])
    return captured[0]


def options(name: str) -> set[str]:
    flags = set(parser_of(name)._option_string_actions)
    if name == 'ablation':  # the flags it does not know go to train.py
        flags |= options('train')
    return flags


def hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """Put ``folder``'s files in a Hugging Face cache as ``repo`` at main, as the Hub client does."""
    base = cache / f'models--{repo.replace("/", "--")}'
    snapshot = base / 'snapshots' / ('0' * 40)
    shutil.copytree(folder, snapshot)
    (base / 'refs').mkdir()
    (base / 'refs' / 'main').write_text('0' * 40)


def test_the_readme_quickstart_runs(tmp_path, monkeypatch):
    quickstart = section(README.read_text(), 'Quickstart')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save('photo.jpg')

    (block,) = fenced(quickstart, 'bash')
    ran = []
    for words in commands(block):
        name, args = recipe_call(words)
        if name == 'train' and '--dataset' in args:  # a real dataset: its command must parse
            recipe('train').parse_args(args)
        elif name == 'train':  # the built-in run, on the tiny model and data of the other tests
            assert run_main('train', *args, *TINY_TRAIN, '--epochs', '1') == 0
        elif name == 'demo':  # a server that runs until stopped: its command must parse (tests/e2e serves it)
            recipe('demo').parse_args(args)
        elif name == 'push_to_hub':  # what it would upload, placed in the offline cache
            assert run_main('push_to_hub', *args, '--dry-run', 'upload') == 0
            hub_cache(tmp_path / 'hub', args[args.index('--repo-id') + 1], tmp_path / 'upload')
        else:
            assert run_main(name, *args) == 0
        ran.append(name)
    assert ran == ['train', 'train', 'predict', 'demo', 'push_to_hub']

    namespace: dict = {}
    blocks = fenced(quickstart, 'python')
    assert len(blocks) == 4
    for n, code in enumerate(blocks, 1):
        exec(compile(code, f'README.md, quickstart block {n}', 'exec'), namespace)
    assert namespace['names'] == [f'glyph_{i:02d}' for i in range(10)]
    assert torch.isfinite(namespace['loss']) and namespace['logits'].shape == (2, 10)
    assert [p['label'] for p in namespace['classifier']('photo.jpg', top_k=3)][0] in namespace['names']


def test_recipe_flags_in_the_docs_exist():
    known, wrong = {}, []
    for page in [README, *PAGES]:
        text = page.read_text()
        inline = [shlex.split(code) for code in re.findall(r'`([^`\n]*recipes/\w+\.py[^`\n]*)`', text)]
        for words in [*inline, *(words for block in fenced(text, 'bash') for words in commands(block))]:
            call = recipe_call(words)
            if call is None:
                continue
            name, args = call
            known.setdefault(name, options(name))
            wrong += [f'{page.name}: {name}.py {a}' for a in args
                      if a.startswith('--') and a.split('=')[0] not in known[name]]
    assert set(known) == {'train', 'evaluate', 'predict', 'visualize', 'export', 'push_to_hub', 'ablation', 'benchmark',
                          'demo'}
    assert not wrong, wrong


@pytest.mark.parametrize('page', ['training.md', 'datasets.md'])
def test_the_flag_tables_name_train_py_flags(page):
    rows = [line.split('|')[1] for line in (DOCS / page).read_text().splitlines() if line.startswith('| `--')]
    flags = {flag for cell in rows for flag in re.findall(r'`(--[a-z][a-z-]*)', cell)}
    assert len(flags) > 5 and not flags - options('train'), sorted(flags - options('train'))


def expand(pattern: str) -> list[str]:
    """``a_{b,c}`` -> ``['a_b', 'a_c']``, as the shell expands braces."""
    found = re.search(r'\{([^}]*)\}', pattern)
    if not found:
        return [pattern]
    return [name for alt in found.group(1).split(',')
            for name in expand(pattern[:found.start()] + alt + pattern[found.end():])]


@pytest.mark.parametrize('page', [README, DOCS / 'models.md'], ids=['README.md', 'models.md'])
def test_the_registered_names_tables_list_what_timm_knows(page):
    text = section(page.read_text(), 'Registered names')
    cells = [line.split('|')[1] for line in text.splitlines() if line.startswith('| ') and 'ssanet' in line]
    names = [name for cell in cells for code in re.findall(r'`(ssanet[^`]*)`', cell) for name in expand(code)]
    assert sorted(names) == sorted(timm.list_models('ssanet*'))
    assert f'{len(names)} names' in text


def test_readme_docs_and_ci_give_the_same_test_command():
    setup = fenced(section(README.read_text(), 'Set-up'), 'bash')[0]
    page = fenced(section((DOCS / 'getting-started.md').read_text(), 'The two set-up commands'), 'bash')[0]
    assert page == setup
    command = next(line for line in setup.splitlines() if "'.[test]'" in line)
    ci = (ROOT / '.ci' / 'run').read_text().replace(' -q ', ' ')
    position = 0
    for step in command.split(' && '):
        found = ci.find(step, position)
        assert found >= 0, f'{step!r}: in the README test command but not, in this order, in .ci/run'
        position = found + len(step)


def anchors(page: Path) -> set[str]:
    from markdown.extensions.toc import slugify  # the docs extra; Python-Markdown's default heading ids
    headings = re.findall(r'^#+ (.+)$', page.read_text(), re.M)
    return {slugify(h.replace('`', ''), '-') for h in headings}


def test_readme_links_resolve():
    targets = re.findall(r'\]\(([^)\s]+)\)', README.read_text())
    local = [t for t in targets if not re.match(r'[a-z]+:', t)]
    assert len(local) > 10
    for target in local:
        path, _, anchor = target.partition('#')
        assert (ROOT / path).exists(), target
        if anchor:
            assert anchor in anchors(ROOT / path), target


def test_no_working_notes_in_the_docs():
    grep = subprocess.run(['grep', '-rn', r'issue [0-9]\|lent\|this session', 'README.md', 'docs/'],
                          cwd=ROOT, capture_output=True, text=True)
    assert grep.returncode == 1 and not grep.stdout, grep.stdout + grep.stderr
