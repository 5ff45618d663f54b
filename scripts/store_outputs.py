#!/usr/bin/env python
"""Execute notebooks as nbdev_test does (same skipped cells, the reduced form unless RTL_FULL=1) and store their
outputs in nbs/, so the docs site and GitHub show them; console progress bars are collapsed the way Jupyter
shows them (carriage returns applied), then nbdev_clean runs. Usage:
    OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore python scripts/store_outputs.py [nbs/PATH.ipynb ...]   (default: all)
    python scripts/store_outputs.py --streams-only [...]   # only collapse the progress bars of stored outputs"""
import shutil, subprocess, sys, tempfile
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
            if o.get('output_type') == 'stream': o['text'] = o['text'].replace('\u2588', '')
    nbformat.write(nb, path)

def main(args):
    streams_only = '--streams-only' in args
    args = [a for a in args if a != '--streams-only']
    nbs = Path('nbs').resolve()
    rels = [Path(a).resolve().relative_to(nbs) for a in args] if args else list_notebooks(nbs)
    if not streams_only:
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp)/'nbs'
            execute_notebooks(nbs, rels, dest)
            for rel in rels: shutil.copy(dest/rel, nbs/rel)
    for rel in rels: collapse_streams(nbs/rel)
    subprocess.run([str(Path(sys.executable).parent/'nbdev_clean')], check=True)

if __name__ == '__main__': main(sys.argv[1:])
