"""Side-by-side cost and robustness of adversarial training methods, measured in one run.

For each method (natural training, PGD-7 AT, free AT with m replays, fast AT (FGSM-RS), optionally TRADES)
the same model is trained from the same initialization on the same batches, in the same order, with a one-cycle
schedule (after an untimed warm-up fit), and the
script prints training wall time per epoch (validation excluded), total training time, clean and PGD-20
accuracy on a fixed validation subset, and the ratios of the times to natural training.

Free AT runs `epochs // m` epochs (each epoch replays every minibatch m times), so that it makes as many
optimizer steps as natural training: its *total* time is the fair comparison; its time per epoch is also
printed (one free-AT epoch = m passes over the data).

Examples:
  python bench/bench_adv_train.py                       # digits source task, SmallCNN, eps 0.2 (about a minute)
  nice python bench/bench_adv_train.py --data cifar10 --n-per-class 500 --width 16 --epochs 8 \
      --methods natural,pgd,free,fast,trades --n-valid 600   # CIFAR-10 animals, eps 8/255 (about an hour on 1 CPU thread)
"""
import argparse, time, sys, warnings
import torch
from fastai.learner import Learner
from fastai.metrics import accuracy
from _timers import EpochTimer
from rtl_fastai.data.all import load_dataset, select_classes, subsample, class_split, task_dls, ArrayData
from rtl_fastai.experiment import make_model, fit_quietly, evaluate
from rtl_fastai.callback.adv_train import PGDTraining, FreeAdvTraining, FastAdvTraining, TRADESTraining

def make_dls(args):
    d = load_dataset(args.data)
    d = select_classes(d, class_split(d).source)
    if args.n_per_class: d = subsample(d, args.n_per_class, seed=0)
    if args.n_valid and args.n_valid < len(d.y_valid):
        g = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(d.y_valid), generator=g)[:args.n_valid].sort().values
        d = ArrayData(d.x_train, d.y_train, d.x_valid[keep], d.y_valid[keep], d.classes, d.name)
    return task_dls(d, bs=args.bs, augment=args.data == 'cifar10', seed=0)

def new_model(args, dls):
    torch.manual_seed(args.seed)
    if args.data == 'cifar10': return make_model('preact18', 3, dls.c, width=args.width)
    return make_model('smallcnn', dls.one_batch()[0].shape[1], dls.c)

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='digits', choices=['digits', 'cifar10'])
    p.add_argument('--eps', type=float, default=None, help='pixel units; default 0.2 (digits) or 8/255 (cifar10)')
    p.add_argument('--epochs', type=int, default=8, help='epochs of natural/PGD/fast/TRADES; free AT runs epochs//m')
    p.add_argument('--m', type=int, default=4, help='replays of free AT')
    p.add_argument('--methods', default='natural,pgd,free,fast')
    p.add_argument('--n-per-class', type=int, default=None)
    p.add_argument('--n-valid', type=int, default=None, help='fixed random validation subset for the PGD-20 evaluation')
    p.add_argument('--width', type=int, default=16, help='PreActResNet18 width (cifar10)')
    p.add_argument('--bs', type=int, default=None)
    p.add_argument('--lr', type=float, default=None)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings('ignore')
    cifar = args.data == 'cifar10'
    eps = args.eps if args.eps is not None else (8/255 if cifar else 0.2)
    args.bs = args.bs or (128 if cifar else 64)
    lr = args.lr or (5e-3 if cifar else 3e-3)
    if args.epochs % args.m: sys.exit(f'--epochs ({args.epochs}) must be a multiple of --m ({args.m}) so free AT matches its cost')
    dls = make_dls(args)
    print(f"data={args.data} source classes={list(dls.vocab)} n_train={len(dls.train_ds)} n_valid={len(dls.valid_ds)} "
          f"eps={eps:.4f} epochs={args.epochs} m={args.m} bs={args.bs} lr={lr} threads={args.threads}", flush=True)
    methods = {'natural': (lambda: None, args.epochs),
               'pgd': (lambda: PGDTraining(eps, steps=7), args.epochs),
               'free': (lambda: FreeAdvTraining(eps, replays=args.m), args.epochs // args.m),
               'fast': (lambda: FastAdvTraining(eps), args.epochs),
               'trades': (lambda: TRADESTraining(eps, beta=6., steps=10), args.epochs)}
    names = {'natural': 'natural', 'pgd': 'PGD-7 AT', 'free': f'free AT (m={args.m})', 'fast': 'fast AT (FGSM-RS)', 'trades': 'TRADES (10 steps, beta 6)'}
    rows = []
    # untimed warm-up (one-off costs: allocator, kernels, caches), so that the first timed method, natural training
    # (every ratio's denominator), pays none of them
    fit_quietly(Learner(make_dls(args), new_model(args, dls), metrics=accuracy), 1, lr, [])
    for k in args.methods.split(','):
        cb, ep = methods[k]
        dls = make_dls(args)   # each method the same batches in the same order (a fresh seeded shuffle)
        learn = Learner(dls, new_model(args, dls), metrics=accuracy)
        timer = EpochTimer()
        extra = cb()
        cbs = [timer] + ([extra] if extra is not None else [])
        fit_quietly(learn, ep, lr, cbs)
        t0 = time.perf_counter()
        r = evaluate(learn, eps, steps=20, alpha=2.5*eps/20)  # PGD-20, step 2.5*eps/steps
        clean, rob, t_eval = r['clean_acc'], r['pgd_acc'], time.perf_counter() - t0
        row = dict(name=names[k], epochs=ep, per_epoch=sum(timer.times)/len(timer.times), total=sum(timer.times),
                   steps=len(learn.recorder.lrs), clean=clean, robust=rob)
        rows.append(row)
        print(f"  {row['name']:26s} epochs={ep:3d} steps={row['steps']:5d} train {row['total']:8.1f}s "
              f"({row['per_epoch']:.1f}s/epoch)  clean {clean:.3f}  PGD-20 {rob:.3f}  [eval {t_eval:.0f}s]", flush=True)
    nat = next((r for r in rows if r['name'] == 'natural'), None)
    print(f"\n| method | epochs | optimizer steps | s/epoch | train time | s/epoch ÷ natural | time ÷ natural | clean acc | PGD-20 acc (eps {eps:.4f}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        re = f"{r['per_epoch']/nat['per_epoch']:.2f}x" if nat else '-'
        rt = f"{r['total']/nat['total']:.2f}x" if nat else '-'
        print(f"| {r['name']} | {r['epochs']} | {r['steps']} | {r['per_epoch']:.2f} | {r['total']:.1f}s | {re} | {rt} | {r['clean']:.3f} | {r['robust']:.3f} |")

if __name__ == '__main__': main()
