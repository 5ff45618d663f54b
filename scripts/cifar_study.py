#!/usr/bin/env python
"""The CPU-scale CIFAR-10 study behind the recorded results in the docs (issues 5, 6 and 7):
animals (6 classes) -> vehicles (4 classes), PreActResNet18 at a small width.

1. sources on animals: natural training, and fast adversarial training (FGSM-RS, eps 8/255);
2. block-by-block frozen transfer to vehicles from both sources (n_retrain 0, 1, 2, 'all');
3. end-to-end fine-tuning of the robust source with feature distillation, lam in a list;
4. low-data regime: head-only transfer vs PGD-7 AT from scratch (same number of steps), N per class in a list;
5. generalization: PGD-7 AT on a small target set with and without distillation toward the robust source.
Every model is evaluated with PGD-20 (L-inf, eps 8/255, step 2/255, random start) on a fixed, class-balanced
subset of the CIFAR-10 test images of its task. Results go to OUT/results.json and OUT/results.md.

    OMP_NUM_THREADS=1 nice python scripts/cifar_study.py   # into cache_dir()/'cifar_study' (~/.cache/rtl_fastai or RTL_CACHE)
"""
import argparse, json, time
from pathlib import Path
import torch
from fastai.vision.all import Learner, accuracy, set_seed
from rtl_fastai.data.all import load_dataset, select_classes, subsample, subsample_valid, class_split, task_dls
from rtl_fastai.models import PreActResNet18
from rtl_fastai.callback.adv_train import PGDTraining
from rtl_fastai.callback.transfer import transfer_learner
from rtl_fastai.callback.distill import FeatureDistillation
from rtl_fastai.experiment import fit_quietly, evaluate, train_source
from rtl_fastai.data.all import cache_dir

EPS = 8/255

def score(learn):
    "Clean and PGD-20 accuracy (step 2/255, seeded random start) on the validation subset, rounded."
    r = evaluate(learn, EPS, steps=20, alpha=2/255, seed=0)
    return dict(clean_acc=round(r['clean_acc'], 4), pgd_acc=round(r['pgd_acc'], 4), n_valid=r['n'])

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=str(cache_dir()/'cifar_study'), help="default: cache_dir()/'cifar_study' (RTL_CACHE)")
    p.add_argument('--width', type=int, default=8)
    p.add_argument('--src-n', type=int, default=2000, help="training images per source class")
    p.add_argument('--src-epochs', type=int, default=8)
    p.add_argument('--tgt-n', type=int, default=500, help="training images per target class")
    p.add_argument('--tgt-epochs', type=int, default=6)
    p.add_argument('--valid-k', type=int, default=100, help="test images per class for evaluation")
    p.add_argument('--lams', default='0,1e-4,1e-3,5e-3,1e-2,1e-1')
    p.add_argument('--low-n', default='10,25,50,100,250')
    p.add_argument('--low-steps', type=int, default=200, help="optimizer steps of every low-data run (both methods)")
    p.add_argument('--at-lrs', default='3e-3', help="learning rates of PGD-7 AT from scratch in the low-data runs, each a row")
    p.add_argument('--gen-n', type=int, default=100, help="training images per class of the generalization experiment")
    p.add_argument('--gen-lam', type=float, default=5e-3)
    p.add_argument('--parts', default='sources,blocks,distill,lowdata,gen')
    p.add_argument('--bs', type=int, default=128)
    a = p.parse_args()
    out = Path(a.out).expanduser(); out.mkdir(parents=True, exist_ok=True)
    resf = out/'results.json'
    res = json.loads(resf.read_text()) if resf.exists() else {}
    # a results file gathers the parts of several runs (`--parts`): each part's rows keep the settings of the run that
    # made them, and a cached source is used again only for the same source settings (its file name holds them)
    settings = vars(a) | dict(eps='8/255', pgd='PGD-20, step 2/255, random start', threads=torch.get_num_threads())
    res['settings'] = settings   # the last run's
    def save(): resf.write_text(json.dumps(res, indent=1))
    def put(part, rows): res[part] = rows; res.setdefault('part_settings', {})[part] = settings; save()
    def log(*s): print(time.strftime('%H:%M:%S'), *s, flush=True)

    cifar = load_dataset('cifar10')
    split = class_split('cifar10')
    src_d = subsample_valid(subsample(select_classes(cifar, split.source), a.src_n), a.valid_k)
    tgt_full = subsample_valid(select_classes(cifar, split.target), a.valid_k)
    tgt_d = subsample(tgt_full, a.tgt_n)
    src_dls = task_dls(src_d, bs=a.bs, seed=0)
    tgt_dls = task_dls(tgt_d, bs=a.bs, seed=0)
    parts = a.parts.split(',')
    def net(n_out): return PreActResNet18(n_out=n_out, width=a.width)
    srcs = {}
    for kind in ('natural', 'robust'):
        fn = out/f'source_{kind}_w{a.width}_n{a.src_n}_e{a.src_epochs}_bs{a.bs}.pth'   # every setting of its training
        had, seconds = res.get('sources', {}).get(kind, {}), None
        if fn.exists():
            set_seed(0, reproducible=True)
            learn = Learner(src_dls, net(src_dls.c), metrics=accuracy)
            learn.model.load_state_dict(torch.load(fn, weights_only=True)); log('loaded', fn)
            if had.get('file') == fn.name: seconds = had.get('seconds')   # its training time, when it was recorded
        else:
            log(f'training {kind} source')
            t = time.time()
            learn = train_source(src_dls, net, a.src_epochs, 3e-3, eps=EPS if kind == 'robust' else None, adv='fast')
            torch.save(learn.model.state_dict(), fn)
            seconds = round(time.time()-t, 1)
        # a record of this very file, scored on this evaluation subset (else scored again, nothing of another kept)
        if 'sources' in parts or had.get('file') != fn.name or had.get('valid_k') != a.valid_k or 'clean_acc' not in had:
            res.setdefault('sources', {})[kind] = dict(seconds=seconds, **score(learn), file=fn.name, valid_k=a.valid_k)
            save()
        log(kind, res['sources'][kind]); srcs[kind] = learn.model

    if 'blocks' in parts:
        rows = []
        for kind, m in srcs.items():
            for nr in (0, 1, 2, 'all'):
                set_seed(0, reproducible=True); t = time.time()
                l = fit_quietly(transfer_learner(m, tgt_dls, n_retrain=nr, metrics=accuracy), a.tgt_epochs, 3e-3)
                rows.append(dict(source=kind, n_retrain=str(nr), seconds=round(time.time()-t, 1), **score(l)))
                log(rows[-1]); put('blocks', rows)

    if 'distill' in parts:
        rows = []
        for lam in [float(x) for x in a.lams.split(',')]:
            set_seed(0, reproducible=True); t = time.time()
            l = transfer_learner(srcs['robust'], tgt_dls, n_retrain='all', metrics=accuracy)
            fit_quietly(l, a.tgt_epochs, 3e-3, [FeatureDistillation(srcs['robust'], lam=lam, warmup_epochs=1)])
            rows.append(dict(lam=lam, seconds=round(time.time()-t, 1), **score(l)))
            log(rows[-1]); put('distill', rows)

    if 'lowdata' in parts:
        # both methods get the same number of optimizer steps; the from-scratch baseline is PGD-7 AT (Madry et al.),
        # the standard, not FGSM-based training, which overfits catastrophically with so few examples
        rows = []
        for n in [int(x) for x in a.low_n.split(',')]:
            bs = min(a.bs, 4*n)
            dls_n = task_dls(subsample(tgt_full, n), bs=bs, seed=0)
            ep = max(1, round(a.low_steps / len(dls_n.train)))
            set_seed(0, reproducible=True); t = time.time()
            l = fit_quietly(transfer_learner(srcs['robust'], dls_n, n_retrain=0, metrics=accuracy), ep, 3e-3)
            rows.append(dict(n_per_class=n, method='robust source, frozen (head only)', epochs=ep,
                             seconds=round(time.time()-t, 1), **score(l)))
            log(rows[-1])
            for lr in [float(x) for x in a.at_lrs.split(',')]:
                t = time.time()
                l = train_source(dls_n, net, ep, lr, eps=EPS, steps=7, alpha=2/255)  # PGD-7 AT from scratch, seed 0
                rows.append(dict(n_per_class=n, method='PGD-7 AT from scratch' + ('' if lr == 3e-3 else f', lr {lr:g}'),
                                 epochs=ep, seconds=round(time.time()-t, 1), **score(l)))
                log(rows[-1]); put('lowdata', rows)

    if 'gen' in parts:
        # the paper's section 6: adversarial training on a small target set, with and without the distillation
        # penalty toward the robust source's features (both PGD-7 AT from scratch, same steps and seed)
        rows = []
        n = a.gen_n
        dls_n = task_dls(subsample(tgt_full, n), bs=min(a.bs, 4*n), seed=0)
        ep = max(1, round(a.low_steps / len(dls_n.train)))
        for lam in (None, a.gen_lam):
            set_seed(0, reproducible=True); t = time.time()
            cbs = [PGDTraining(EPS, steps=7, alpha=2/255)] + ([] if lam is None else [FeatureDistillation(srcs['robust'], lam=lam)])
            l = fit_quietly(Learner(dls_n, net(dls_n.c), metrics=accuracy), ep, 3e-3, cbs)
            rows.append(dict(n_per_class=n, method='PGD-7 AT' + ('' if lam is None else f' + distillation (lam={lam:g})'),
                             epochs=ep, seconds=round(time.time()-t, 1), **score(l)))
            log(rows[-1]); put('gen', rows)

    import pandas as pd
    md = [f"settings: {res['settings']}"]
    for k in ('blocks', 'distill', 'lowdata', 'gen'):
        if k in res: md += ['', f'### {k}', f"settings: {res.get('part_settings', {}).get(k, 'not recorded')}",
                            pd.DataFrame(res[k]).to_markdown(index=False)]
    md += ['', '### sources', pd.DataFrame(res['sources']).T.to_markdown()]
    (out/'results.md').write_text('\n'.join(md) + '\n'); log('wrote', out/'results.md')

if __name__ == '__main__': main()
