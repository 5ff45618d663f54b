#!/usr/bin/env python
"""How the defaults of `rtl-fastai run` (issue 13) were chosen: on a validation split carved from the TRAINING images
(20% of each class's training images, or `--test` to evaluate on the test images, which the choice never used).

Trains a natural and a PGD-AT source on the source classes (cached in `cache_dir()`, RTL_CACHE, by their settings), then the rows of the
paper's findings on the target classes (head-only transfer from both sources, fine-tuning with and without
distillation for each lam, and in the low-data regime transfer against PGD-7 AT from scratch with the same number of
optimizer steps), each evaluated with PGD-20 (step eps/4, seeded) on the validation split. Prints (clean %, PGD %, s).

    OMP_NUM_THREADS=1 nice python scripts/tune_defaults.py --data mnist --eps 0.2 --widths 16,32 --src-n 1000 \\
        --tgt-n 200 --val-n 50 --src-epochs 8 --tgt-epochs 8 --head-epochs 30 --bs 64 --head-lr 3e-2 --low-steps 150 \\
        --parts head,low,ft --low-n 10 --low-retrain 0,1 --lams 0.03,0.1 --warm 2

(the run behind the chosen defaults, except the distillation penalty: `--layer block1 --lams 0.003`, chosen with
`run_pipeline(holdout=100)`'s split, see the notebook; the other rows of the table in nbs/08_pipeline.ipynb change --eps, --src-n,
--src-epochs, --lams, --low-n)
"""
import argparse, time, json, os
import torch
from fastai.vision.all import Learner, accuracy, set_seed
from rtl_fastai.data.all import load_dataset, select_classes, subsample, subsample_valid, class_split, task_dls, ArrayData, cache_dir
from rtl_fastai.core import make_dir
from rtl_fastai.models import SmallCNN
from rtl_fastai.callback.adv_train import PGDTraining
from rtl_fastai.callback.adv_valid import RobustAccuracy  # noqa
from rtl_fastai.callback.transfer import transfer_learner
from rtl_fastai.callback.distill import FeatureDistillation

p = argparse.ArgumentParser()
p.add_argument('--data', default='digits'); p.add_argument('--eps', type=float, default=0.2)
p.add_argument('--src-epochs', type=int, default=40); p.add_argument('--src-steps', type=int, default=7)
p.add_argument('--tgt-epochs', type=int, default=10); p.add_argument('--lams', default='0.05,0.2')
p.add_argument('--low-n', default='20'); p.add_argument('--low-steps', type=int, default=100)
p.add_argument('--bs', type=int, default=64); p.add_argument('--lr', type=float, default=3e-3)
p.add_argument('--seed', type=int, default=0); p.add_argument('--src-n', type=int, default=None)
p.add_argument('--tgt-n', type=int, default=None); p.add_argument('--test', action='store_true')
p.add_argument('--warm', type=int, default=2); p.add_argument('--widths', default='32,64')
p.add_argument('--val-n', type=int, default=None); p.add_argument('--low-retrain', default='0'); p.add_argument('--parts', default='head,ft,low'); p.add_argument('--head-lr', type=float, default=3e-2); p.add_argument('--head-epochs', type=int, default=None)
p.add_argument('--layer', default=None, help='module whose output is distilled (e.g. block1); default the pooled features')
a = p.parse_args()
torch.set_num_threads(1)
widths = tuple(int(w) for w in a.widths.split(','))
def carve(d, pct=0.2, seed=0):
    g = torch.Generator().manual_seed(seed); tr, va = [], []
    for c in range(d.c):
        idx = (d.y_train == c).nonzero().flatten(); idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, round(pct*len(idx))); va.append(idx[:k]); tr.append(idx[k:])
    tr, va = torch.cat(tr).sort().values, torch.cat(va).sort().values
    return ArrayData(d.x_train[tr], d.y_train[tr], d.x_train[va], d.y_train[va], list(d.classes), d.name)
ds = load_dataset(a.data); sp = class_split(ds)
src = select_classes(ds, sp.source); tgt = select_classes(ds, sp.target)
if not a.test: src, tgt = carve(src), carve(tgt)
if a.src_n: src = subsample(src, a.src_n)
if a.tgt_n: tgt = subsample(tgt, a.tgt_n)
if a.val_n: src, tgt = subsample_valid(src, a.val_n), subsample_valid(tgt, a.val_n)
print('n', src.n_train if hasattr(src,'n_train') else len(src.y_train), len(src.y_valid), len(tgt.y_train), len(tgt.y_valid), flush=True)
sd = task_dls(src, bs=a.bs, seed=a.seed); td = task_dls(tgt, bs=a.bs, seed=a.seed)
def fit(l, ep, cbs=(), lr=None):
    with l.no_bar(), l.no_logging(): l.fit_one_cycle(ep, lr or a.lr, cbs=list(cbs))
    return l
def ev(l):
    set_seed(a.seed, reproducible=True)
    r = l.robust_validate(eps=a.eps, steps=20, alpha=a.eps/4, show_progress=False)
    return round(r['clean_acc']*100, 1), round(r['robust_acc']*100, 1)
def src_model(dls):
    return SmallCNN(n_in=1, n_out=dls.c, widths=widths)
out = {}
def rec(name, l, t):
    out[name] = ev(l) + (round(time.time()-t, 1),); print(name, out[name], flush=True)
t0 = time.time()
key = f"{a.data}_{a.eps}_{a.widths}_{a.src_n}_{a.src_epochs}_{a.src_steps}_{a.seed}_{a.bs}_{a.lr}_{a.test}"
def get_src(kind):
    fn = str(make_dir(cache_dir(), 'RTL_CACHE')/f"tune_src_{kind}_{key}.pth")
    set_seed(a.seed, reproducible=True); t = time.time(); l = Learner(sd, src_model(sd), metrics=accuracy)
    if os.path.exists(fn): l.model.load_state_dict(torch.load(fn)); print('loaded', fn)
    else: fit(l, a.src_epochs, [PGDTraining(a.eps, steps=a.src_steps)] if kind == 'rob' else []); torch.save(l.model.state_dict(), fn)
    rec('src_'+kind, l, t); return l
nat, rob = get_src('nat'), get_src('rob')
parts = a.parts.split(',')
if 'head' in parts:
    for k, m in (('nat', nat), ('rob', rob)):
        set_seed(a.seed, reproducible=True); t = time.time(); l = fit(transfer_learner(m, td, n_retrain=0, metrics=accuracy), a.head_epochs or a.tgt_epochs, lr=a.head_lr); rec(f'head_{k}', l, t)
    set_seed(a.seed, reproducible=True); t = time.time(); l = fit(transfer_learner(rob, td, n_retrain=1, metrics=accuracy), a.tgt_epochs) if 'block' in parts else None
    if l is not None: rec(f'block_rob', l, t)
if 'ft' in parts:
    set_seed(a.seed, reproducible=True); t = time.time(); l = fit(transfer_learner(rob, td, n_retrain='all', metrics=accuracy), a.tgt_epochs); rec('ft_plain', l, t)
    for lam in [float(x) for x in a.lams.split(',')]:
        set_seed(a.seed, reproducible=True); t = time.time()
        l = fit(transfer_learner(rob, td, n_retrain='all', metrics=accuracy), a.tgt_epochs, [FeatureDistillation(rob.model, lam=lam, layer=a.layer, warmup_epochs=a.warm)]); rec(f'ft_distill_{lam:g}', l, t)
if 'low' in parts:
    for n in [int(x) for x in a.low_n.split(',')]:
        dn = task_dls(subsample(tgt, n), bs=min(a.bs, 4*n), seed=a.seed)
        ep = max(1, round(a.low_steps/len(dn.train)))
        for nr in [int(x) for x in a.low_retrain.split(',')]:
            set_seed(a.seed, reproducible=True); t = time.time(); l = fit(transfer_learner(rob, dn, n_retrain=nr, metrics=accuracy), ep, lr=a.head_lr if nr == 0 else None); rec(f'low{n}_rob_retrain{nr}', l, t)
        set_seed(a.seed, reproducible=True); t = time.time(); l = fit(Learner(dn, src_model(dn), metrics=accuracy), ep, [PGDTraining(a.eps, steps=7)]); rec(f'low{n}_at_scratch', l, t)
print('total', round(time.time()-t0, 1), json.dumps(out), flush=True)
