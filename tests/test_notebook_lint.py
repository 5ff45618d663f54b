"Checks on the notebooks themselves that neither nbdev_test nor pytest would catch otherwise."
import ast, json
from pathlib import Path
import pytest

NBS = sorted(p for p in (Path(__file__).parent.parent/'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)

def _cells(nb_path):
    nb = json.loads(nb_path.read_text())
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] == 'code': yield i, ''.join(c['source'])

def _mixes_imports(src):
    "nbdev's docs processing re-runs every cell holding an import on its own: such cells must hold only imports."
    lines = src.splitlines()
    if 'nbdev_export()' in src: return False  # nbdev's processing skips these cells
    if any(l.strip().startswith('#|') and any(d in l for d in ('export', 'exporti', 'exports', 'exec_doc', 'eval: false', 'eval:false')) for l in lines):
        return False
    try: tree = ast.parse('\n'.join(l for l in lines if not l.lstrip().startswith(('%', '!'))))
    except SyntaxError: return False
    nodes = list(ast.walk(tree))
    has_imp = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes)
    has_code = any(isinstance(n, (ast.Expr, ast.Assign)) for n in nodes)
    return has_imp and has_code

@pytest.mark.parametrize('nb', NBS, ids=[str(p.relative_to(p.parents[1] if p.parent.name != 'nbs' else p.parent)) for p in NBS])
def test_imports_in_cells_of_their_own(nb):
    bad = [i for i, src in _cells(nb) if _mixes_imports(src)]
    assert not bad, (f"{nb.name}: cells {bad} mix imports with other code; nbdev's docs build re-runs import cells "
                     "alone, so move the imports into a cell of their own")


# ---------------------------------------------------------------------------------------------------------------
# notebooks whose stored outputs are their recorded full form (`RTL_FULL=1`)
import sys
sys.path.insert(0, str(Path(__file__).parent.parent/'scripts'))
import store_outputs

@pytest.mark.parametrize('rel', sorted(store_outputs.FULL_FORM))
def test_full_form_outputs_stored(rel):
    "The stored outputs of a FULL_FORM notebook come from `RTL_FULL=1`: the cell showing `FULL` printed True."
    nb = json.loads((Path(__file__).parent.parent/'nbs'/rel).read_text())
    shown = [''.join(o.get('data', {}).get('text/plain', '')) for c in nb['cells'] if c['cell_type'] == 'code'
             and ''.join(c['source']).rstrip().splitlines()[-1].startswith('FULL') for o in c['outputs']]
    assert shown and shown[0].startswith('(True'), f"{rel}: stored outputs are not the full form ({shown[:1]})"

def test_store_outputs_keeps_full_form(monkeypatch, capsys):
    "Without RTL_FULL=1, store_outputs leaves FULL_FORM notebooks alone (their recorded results) and runs the others."
    ran = []
    monkeypatch.delenv('RTL_FULL', raising=False)
    monkeypatch.setattr(store_outputs, 'execute_notebooks', lambda nbs, rels, dest: ran.extend(rels))
    monkeypatch.setattr(store_outputs.shutil, 'copy', lambda *a: None)
    monkeypatch.setattr(store_outputs, 'collapse_streams', lambda p: ran.append(('collapse', p.name)))
    monkeypatch.setattr(store_outputs.subprocess, 'run', lambda *a, **k: None)
    monkeypatch.chdir(Path(__file__).parent.parent)
    store_outputs.main(['nbs/tutorials/paper_cpu_scale.ipynb', 'nbs/tutorials/quick_start.ipynb',
                        'nbs/tutorials/own_folder.ipynb'])
    assert ran == [Path('tutorials/own_folder.ipynb'), ('collapse', 'own_folder.ipynb')]
    out = capsys.readouterr().out
    assert all(f'{n}.ipynb keeps its stored full-form outputs' in out for n in ('paper_cpu_scale', 'quick_start'))
