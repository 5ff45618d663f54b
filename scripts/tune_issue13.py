#!/usr/bin/env python
"""The search behind the MNIST distillation defaults (issue 13; nbs/08_pipeline.ipynb, "Defaults per dataset"): on the
validation split of `run_pipeline(holdout=100)` (100 training images per class held out; the test images unused).

    OMP_NUM_THREADS=1 python scripts/tune_issue13.py SEED x '[{"kind":"ft","layer":"block1","lams":[0.001,0.003,0.01]},{"kind":"low","n":10}]' ['{"source_epochs":12}']

Each config: {"kind":"ft", "lr", "ep", "warm", "lams", "plain", "pre", "layer", "pen"} or {"kind":"low", "n", "steps", "nr", "at", "lr", "at_lr", "lams", "ft_lr", "warm", "layer", "at_eps"}; the defaults may hold "src_eps", the robust source's training radius.
The optional last argument overrides the MNIST defaults. The robust source of each seed and source setting is cached in
`cache_dir()`/issue13_rob_SEED_KEY_epsEPS.pth (RTL_CACHE; KEY: every setting of its training). Prints one JSON line per row (clean %, PGD-20 %, s)."""
import sys, time, os, json, torch
torch.set_num_threads(1)
from fastai.vision.all import Learner, accuracy, set_seed
from rtl_fastai.pipeline import _defaults, _seed_data
from rtl_fastai.data.arrays import class_split, subsample
from rtl_fastai.data.external import load_dataset
from _source_cache import source_file   # (scripts/, beside this script)
from rtl_fastai.data.loaders import task_dls
from rtl_fastai.experiment import make_model, fit_quietly, evaluate, train_source
from rtl_fastai.callback.adv_train import PGDTraining
from rtl_fastai.callback.transfer import transfer_learner
from rtl_fastai.callback.distill import FeatureDistillation
seed = int(sys.argv[1]); mode = sys.argv[2]; cfgs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else []
d = _defaults('mnist'); d.update(json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}); d['holdout'] = 100; eps = d['eps']
ds = load_dataset('mnist'); sp = class_split(ds)
src, tgt, tgt_n, _ = _seed_data(ds, list(sp.source), list(sp.target), d, seed)  # the pipeline's split
kw = dict(bs=d['bs'], seed=seed)
src_dls = task_dls(src, **kw); tgt_dls = task_dls(tgt_n, **kw)
src_eps = d.get('src_eps', eps)  # the robust source's training radius (default: the evaluation's)
fn = source_file('issue13_rob', seed, d, src_eps)
t = time.time()
if os.path.exists(fn):
    l = Learner(src_dls, make_model('smallcnn', 1, src_dls.c, d['width']), metrics=accuracy); l.model.load_state_dict(torch.load(fn))
else:
    l = train_source(src_dls, 'smallcnn', d['source_epochs'], d['lr'], d['width'], eps=src_eps, steps=d['at_steps'], seed=seed); torch.save(l.model.state_dict(), fn)
rob = l; print('src', seed, evaluate(rob, eps, steps=20, seed=seed), round(time.time()-t,1), flush=True)
ev = lambda l: evaluate(l, eps, steps=20, seed=seed)
def row(name, make, ep, lr, cbs=()):
    set_seed(seed, reproducible=True); t = time.time(); l = fit_quietly(make(), ep, lr, cbs); r = ev(l)
    print(json.dumps(dict(seed=seed, name=name, clean=round(100*r['clean_acc'],1), pgd=round(100*r['pgd_acc'],1), s=round(time.time()-t,1))), flush=True)
for c in cfgs:
    if c['kind'] == 'ft':
        lr, ep = c.get('lr', d['lr']), c.get('ep', d['target_epochs'])
        if c.get('plain', True): row(f"plain lr{lr} ep{ep}", lambda: transfer_learner(rob, tgt_dls, n_retrain='all', metrics=accuracy), ep, lr)
        for lam in c['lams']:
            w = c.get('warm', d['warmup_epochs'])
            row(f"distill lam{lam} lr{lr} ep{ep} warm{w} {c.get('layer')} {c.get('pen','l1')}", lambda: transfer_learner(rob, tgt_dls, n_retrain='all', metrics=accuracy), ep, lr,
                [FeatureDistillation(rob.model, lam=lam, warmup_epochs=w, precompute=c.get('pre', False), layer=c.get('layer'), penalty=c.get('pen', 'l1'))])
    else:
        n, steps, nr = c['n'], c.get('steps', d['low_steps']), c.get('nr', d['low_retrain'])
        low = task_dls(subsample(tgt, n, seed=seed), bs=min(d['bs'], 4*n), seed=seed)
        low_ep = max(1, round(steps/len(low.train)))
        row(f"low N{n} steps{steps} transfer nr{nr} lr{c.get('lr')}", lambda: transfer_learner(rob, low, n_retrain=nr, metrics=accuracy), low_ep, c.get('lr') or (d['head_lr'] if nr == 0 else d['lr']))
        for lam in c.get('lams', []):  # end-to-end fine-tuning with the distillation penalty, on the low-data set
            w = c.get('warm', 0)
            row(f"low N{n} steps{steps} distill lam{lam} lr{c.get('ft_lr', d['lr'])} warm{w} {c.get('layer')}", lambda: transfer_learner(rob, low, n_retrain='all', metrics=accuracy), low_ep, c.get('ft_lr', d['lr']),
                [FeatureDistillation(rob.model, lam=lam, warmup_epochs=w, layer=c.get('layer'))])
        if c.get('at', True): row(f"low N{n} steps{steps} AT lr{c.get('at_lr')} eps{c.get('at_eps', eps)}", lambda: Learner(low, make_model('smallcnn', low.train_ds.x.shape[1], low.c, d['width']), metrics=accuracy), low_ep, c.get('at_lr') or d['lr'], [PGDTraining(c.get('at_eps', eps), steps=d['at_steps'])])
