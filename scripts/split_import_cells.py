#!/usr/bin/env python
"""Split notebook cells that mix imports with other code (nbdev's docs processing re-runs import cells on
their own, so such cells break `nbdev_docs` and scripts/docs.sh). Top-level imports move into a new cell
just before, with the same `#|` directives. Usage: python scripts/split_import_cells.py [NOTEBOOK ...]"""
import ast, json, sys, uuid
from pathlib import Path

_show_dirs = ('export', 'exporti', 'exports', 'exec_doc')

def _directives(lines):
    return [l for l in lines if l.lstrip().startswith('#|')]

def split_cell(src):
    "Return `(import_src, rest_src)` when `src` mixes top-level imports with other code, else None."
    lines = src.splitlines()
    dirs = _directives(lines)
    if any(any(d in l.split() or l.replace(' ','').endswith(d) for d in _show_dirs) for l in dirs): return None
    if any('eval:' in l.replace(' ', '') and 'false' in l for l in dirs): return None
    try: tree = ast.parse(src)
    except SyntaxError: return None
    imps = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if not imps or len(imps) == len(tree.body): return None
    if not any(isinstance(n, (ast.Expr, ast.Assign)) for n in ast.walk(tree)): return None
    take = set()
    for n in imps: take.update(range(n.lineno-1, n.end_lineno))
    imp = dirs + [lines[i] for i in sorted(take)]
    rest = [l for i, l in enumerate(lines) if i not in take]
    while rest and not rest[0].strip(): rest.pop(0)
    return '\n'.join(imp), '\n'.join(rest)

def _src(s): 
    ls = s.split('\n'); return [l+'\n' for l in ls[:-1]] + [ls[-1]]

def fix(path):
    nb = json.loads(Path(path).read_text())
    out, n = [], 0
    for c in nb['cells']:
        if c['cell_type'] == 'code':
            r = split_cell(''.join(c['source']))
            if r:
                n += 1
                new = dict(cell_type='code', execution_count=None, metadata={}, outputs=[], source=_src(r[0]))
                if 'id' in c: new['id'] = uuid.uuid4().hex[:8]
                out.append(new)
                c = dict(c, source=_src(r[1]))
        out.append(c)
    if n:
        nb['cells'] = out
        Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return n

if __name__ == '__main__':
    paths = sys.argv[1:] or sorted(str(p) for p in Path('nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
    for p in paths:
        n = fix(p)
        if n: print(f"{p}: split {n} cell(s)")
