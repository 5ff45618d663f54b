"The layers of DEVELOPING.md: no module of rtl_fastai imports a module of a later layer, and there is no import cycle"
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent/'rtl_fastai'
LAYERS = [['core'],
          ['data', 'data.arrays', 'data.external', 'data.augment', 'data.loaders', 'data.folder', 'data.all',
           'models', 'hub', 'checkpoint'],
          ['attacks', 'distributed'],
          ['callback'] + ['callback.' + m for m in ('adv_valid', 'adv_train', 'batch_items', 'freeze', 'feature_cache',
                                                    'transfer', 'distill')],
          ['vis', 'report', 'experiment', 'pipeline', 'job', 'cli'],
          ['all', '']]  # '' is rtl_fastai/__init__.py
LAYER = {m: i for i, ms in enumerate(LAYERS) for m in ms}

def _modules():
    "`{dotted name inside rtl_fastai: path}` of every module but nbdev's `_modidx`"
    res = {}
    for p in ROOT.rglob('*.py'):
        if p.name == '_modidx.py': continue
        parts = list(p.relative_to(ROOT).with_suffix('').parts)
        if parts[-1] == '__init__': parts = parts[:-1]
        res['.'.join(parts)] = p
    return res

def _imports(name, path):
    "The modules of rtl_fastai that `name` imports (`from .x import`, `from ..x import`, `from rtl_fastai.x import`)"
    pkg = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
    res = set()
    for line in path.read_text().splitlines():
        if r := re.match(r'\s*from rtl_fastai\.([\w.]+) import', line): res.add(r.group(1)); continue
        if r := re.match(r'\s*from (\.+)([\w.]*) import', line):
            base = pkg[:len(pkg) - (len(r.group(1)) - 1)]
            res.add('.'.join(base + ([r.group(2)] if r.group(2) else [])))
    return res

def _graph():
    mods = _modules()
    return mods, {m: {t for t in _imports(m, p) if t in mods} for m, p in mods.items()}

def test_every_module_has_a_layer():
    mods, _ = _graph()
    missing = sorted(m for m in mods if m not in LAYER)
    assert not missing, f"add {missing} to LAYERS in tests/test_layers.py and to the Layers section of DEVELOPING.md"

def test_no_upward_import():
    _, g = _graph()
    bad = [f"{m} (layer {LAYER[m]}) imports {t} (layer {LAYER[t]})" for m, ts in g.items() for t in ts
           if m in LAYER and t in LAYER and LAYER[t] > LAYER[m]]
    assert not bad, bad

def test_no_import_cycle():
    _, g = _graph()
    state, cycles = {}, []
    def visit(u, stack):
        state[u] = 1; stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == 1: cycles.append(stack[stack.index(v):] + [v])
            elif not state.get(v): visit(v, stack)
        stack.pop(); state[u] = 2
    for m in sorted(g):
        if not state.get(m): visit(m, [])
    assert not cycles, cycles

def test_the_check_sees_imports():
    "The parser finds relative imports at both depths (a check that finds nothing would pass vacuously)"
    _, g = _graph()
    assert 'core' in g['models'] and {'core', 'models'} <= g['callback.freeze'] and 'data.arrays' in g['data.external']
