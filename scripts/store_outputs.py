#!/usr/bin/env python
"""Execute notebooks as nbdev_test does (same skipped cells, the reduced form unless RTL_FULL=1) and store their
outputs in nbs/, so the docs site and GitHub show them; console progress bars are collapsed the way Jupyter
shows them (carriage returns applied), then nbdev_clean runs. Usage:
    OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore python scripts/store_outputs.py [nbs/PATH.ipynb ...]   (default: all)
    python scripts/store_outputs.py --streams-only [...]   # only collapse the progress bars of stored outputs
The notebooks in FULL_FORM keep the outputs of their full form (`RTL_FULL=1`, long runs): without RTL_FULL=1 they
are left as they are, so a reduced run never overwrites recorded results."""
import re, os, shutil, subprocess, sys, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from docs_build import execute_notebooks, list_notebooks

def collapse_streams(path):
    "Apply carriage returns in stored stream outputs (fastprogress's console bars), as Jupyter displays them."
    import nbformat
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor
    nb = nbformat.read(path, as_version=4)
    nb, _ = CoalesceStreamsPreprocessor(enabled=True).preprocess(nb, {})
    for c in nb.cells:
        for o in c.get('outputs', []):
            if o.get('output_type') != 'stream': continue
            text = _JIT_WARNING.sub('', o['text'])   # torch's notice about fastai's own code: noise on every page
            lines = text.replace('\u2588', '').split('\n')
            o['text'] = '\n'.join(l for l in lines if not (l.strip() and _BAR_LEFT.match(l)))   # blank lines kept
        # what is left of a bar that ended (its label, a frozen 0%), or nothing: no empty output box on the page
        if c.cell_type == 'code':
            c['outputs'] = [o for o in c.outputs if o.get('output_type') != 'stream' or o['text'].strip()]
        else: c.pop('outputs', None)
    nbformat.write(nb, path)

# recent torch deprecates `torch.jit.script`, which fastai uses at import (the CLI filters the same warning)
_JIT_WARNING = re.compile(r'[^\n]*FutureWarning: `torch\.jit\.script` is deprecated[^\n]*\n(\s*warnings\.warn\(\n)?')

# a line that only holds what a finished fastprogress bar leaves: its label ("Epoch 1/1 :"), an unfilled bar, spaces
_BAR_LEFT = re.compile(r'^\s*(Epoch \d+/\d+ :)?\s*(\|[-\s]*\|\s*\d+\.\d+% \[\d+/\d+ [^\]]*\])?\s*$')

# stored outputs come from RTL_FULL=1: the paper tutorial (22.5 minutes on one CPU thread, its record), quick_start (52 s)
FULL_FORM = {'tutorials/paper_cpu_scale.ipynb', 'tutorials/quick_start.ipynb'}

def main(args):
    streams_only = '--streams-only' in args
    args = [a for a in args if a != '--streams-only']
    nbs = Path('nbs').resolve()
    rels = [Path(a).resolve().relative_to(nbs) for a in args] if args else list_notebooks(nbs)
    if not streams_only and os.environ.get('RTL_FULL') != '1':
        kept = [r for r in rels if r.as_posix() in FULL_FORM]
        for r in kept: print(f"store_outputs: {r} keeps its stored full-form outputs; run with RTL_FULL=1 to replace them")
        rels = [r for r in rels if r.as_posix() not in FULL_FORM]
    if not streams_only:
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp)/'nbs'
            execute_notebooks(nbs, rels, dest)
            for rel in rels: shutil.copy(dest/rel, nbs/rel)
    for rel in rels: collapse_streams(nbs/rel)
    subprocess.run([str(Path(sys.executable).parent/'nbdev_clean')], check=True)

if __name__ == '__main__': main(sys.argv[1:])
