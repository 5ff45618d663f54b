#!/usr/bin/env python
"""Probe: MNIST 0-4 -> 5-9 under an L2 threat model, on the validation split (holdout=100). Not the test images."""
# Usage: OMP_NUM_THREADS=1 python scripts/probe_l2.py SEED EPS '{"tr":[[1,1e-3],[0,3e-2]],"at":[0.3,0.1,0.03]}'
# (issue 13, fourth round: robust sources, head-only transfer and the low-data rows under an L2 threat model;
#  sources cached in `cache_dir()`/l2probe_*.pth, RTL_CACHE, by every setting of their training)
import sys, time, os, json, torch
torch.set_num_threads(1)
from fastai.vision.all import Learner, accuracy, set_seed
from rtl_fastai.pipeline import _defaults, _seed_data
from rtl_fastai.attacks import ThreatModel
from rtl_fastai.data.arrays import class_split, subsample
from rtl_fastai.data.external import load_dataset
from _source_cache import source_file   # (scripts/, beside this script)
from rtl_fastai.data.loaders import task_dls
from rtl_fastai.experiment import make_model, fit_quietly, evaluate, train_source
from rtl_fastai.callback.adv_train import PGDTraining
from rtl_fastai.callback.transfer import transfer_learner
seed = int(sys.argv[1]); eps = float(sys.argv[2]); cfg = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
d = _defaults('mnist'); d.update(cfg.get('d', {})); d['holdout'] = 100
tm_train = ThreatModel(eps, 7, norm='l2'); tm_eval = ThreatModel(eps, 20, alpha=eps/4, norm='l2')
ds = load_dataset('mnist'); sp = class_split(ds)
src, tgt, tgt_n, _ = _seed_data(ds, list(sp.source), list(sp.target), d, seed)  # the pipeline's split
kw = dict(bs=d['bs'], seed=seed)
src_dls = task_dls(src, **kw); tgt_dls = task_dls(tgt_n, **kw)
ev = lambda l: evaluate(l, tm_eval, seed=seed)
def out(name, r, t): print(json.dumps(dict(seed=seed, eps=eps, name=name, clean=round(100*r['clean_acc'],1), pgd=round(100*r['pgd_acc'],1), s=round(t,1))), flush=True)
srcs = {}
for k in ('natural', 'robust'):
    fn = source_file(f"l2probe_{k}", seed, d, eps)
    t = time.time()
    if os.path.exists(fn):
        l = Learner(src_dls, make_model('smallcnn', 1, src_dls.c, d['width']), metrics=accuracy); l.model.load_state_dict(torch.load(fn))
    else:
        l = train_source(src_dls, 'smallcnn', d['source_epochs'], d['lr'], d['width'], eps=tm_train if k == 'robust' else None, seed=seed)
        torch.save(l.model.state_dict(), fn)
    srcs[k] = l; out(f'source {k}', ev(l), time.time()-t)
def row(name, make, ep, lr, cbs=()):
    set_seed(seed, reproducible=True); t = time.time(); l = fit_quietly(make(), ep, lr, cbs); out(name, ev(l), time.time()-t)
if cfg.get('f1', True):
    for k in ('natural', 'robust'):
        row(f'F1 head-only {k}', lambda: transfer_learner(srcs[k], tgt_dls, n_retrain=0, metrics=accuracy), d['head_epochs'], d['head_lr'])
for n in cfg.get('ns', [10]):
    low = task_dls(subsample(tgt, n, seed=seed), bs=min(d['bs'], 4*n), seed=seed)
    low_ep = max(1, round(d['low_steps']/len(low.train)))
    for nr, lr in cfg.get('tr', [[1, 1e-3]]):
        row(f'N{n} transfer nr{nr} lr{lr}', lambda: transfer_learner(srcs['robust'], low, n_retrain=nr, metrics=accuracy), low_ep, lr)
    for at_lr in cfg.get('at', [0.3, 0.03]):
        row(f'N{n} AT scratch lr{at_lr}', lambda: Learner(low, make_model('smallcnn', 1, low.c, d['width']), metrics=accuracy), low_ep, at_lr, [PGDTraining(tm_train)])
