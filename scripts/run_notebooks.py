#!/usr/bin/env python
"""Run notebooks' code cells as `nbdev_test` does (the same skipped cells), with execnb alone: for an environment
where nbdev does not import, such as `.venv-newfastai` (nbdev 2.4.14 needs fastcore<2). `nbdev_export` calls and
`show_doc` do nothing there. The notebooks are executed in a temporary copy: nothing in nbs/ changes.
Usage: python scripts/run_notebooks.py nbs/tutorials/quick_start.ipynb [...]   (exit status 1 if one fails)"""
import os, shutil, sys, tempfile, time, types
from pathlib import Path
# IPython puts an activated virtualenv's packages first on `sys.path` (its `init_virtualenv`): the shell would import
# the fastai of the venv the scripts activated (.venv) rather than this interpreter's (.venv-newfastai)
os.environ.pop('VIRTUAL_ENV', None)
import fastai   # this interpreter's, before any shell: the notebooks must use it
from execnb.nbio import read_nb
from execnb.shell import CaptureShell

_SKIP_FLAGS = {'notest', 'slow'}   # nbdev_test's default skipped flags (settings.ini tst_flags adds none)
_STUB = '''import sys, types
if 'nbdev' not in sys.modules:   # nbdev may not import here: its export call and show_doc do nothing
    try: import nbdev, nbdev.showdoc
    except Exception:
        m, sd = types.ModuleType('nbdev'), types.ModuleType('nbdev.showdoc')
        m.nbdev_export = lambda *a, **k: None; sd.show_doc = lambda *a, **k: None; sd.__all__ = ['show_doc']
        m.showdoc = sd; sys.modules['nbdev'], sys.modules['nbdev.showdoc'] = m, sd'''

def _directives(src):
    d = {}
    for l in src.splitlines():
        l = l.strip()
        if not l: continue
        if not l.startswith('#|'): break
        parts = l[2:].split()
        if parts: d[parts[0].rstrip(':')] = parts[1:]
    return d

def _skip(cell):
    "Cells `nbdev_test` skips (`eval: false`, the skipped flags), markdown, and the export call"
    if cell.cell_type != 'code' or 'nbdev_export(' in cell.source: return True
    d = _directives(cell.source)
    return d.get('eval', [''])[0].lower() == 'false' or bool(_SKIP_FLAGS & d.keys())

def run(path:Path)->bool:
    with tempfile.TemporaryDirectory() as tmp:
        fn = Path(tmp)/path.name
        shutil.copy(path, fn)
        nb, k, t0, cwd = read_nb(fn), CaptureShell(fn), time.time(), os.getcwd()
        os.environ['IN_TEST'] = '1'
        os.chdir(path.parent)   # relative paths resolve as in the notebook's folder
        try:
            k.run(_STUB)
            r = k.run_cell(f"import fastai; assert fastai.__version__ == {fastai.__version__!r}, "
                           f"f'the notebook imports fastai {{fastai.__version__}} from {{fastai.__file__}}, not {fastai.__version__}'")
            if r.exception is not None: raise r.exception
            k.run_all(nb, exc_stop=True, preproc=_skip)
            ok = True
        except Exception:
            ok = False
            sys.stderr.write(k.prettytb(fname=path) + '\n')
        finally: os.chdir(cwd); os.environ.pop('IN_TEST', None)
    print(f"{'ok  ' if ok else 'FAIL'} {path} ({time.time()-t0:.1f}s)", flush=True)
    return ok

if __name__ == '__main__':
    results = [run(Path(a).resolve()) for a in sys.argv[1:]]
    sys.exit(0 if all(results) else 1)
