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
