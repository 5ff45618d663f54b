"""Training-epoch time of frozen-block transfer, measured side by side in one run.

1. head-only training (`n_retrain=0`) with and without the feature cache (`FeatureCache`);
2. retraining the last block (`n_retrain=1`, with and without the cache) vs full fine-tuning (`n_retrain='all'`).

Only the training phase of each epoch is timed (validation always runs the full model and is the same
for all). The cache is built once, at the start of the first `fit`, and reused by later fits on the same
training set; its build time is printed separately and also amortised over the timed epochs.

    python bench/bench_transfer.py                      # CIFAR-10 vehicles, PreActResNet18 width 16, 250/class
    python bench/bench_transfer.py --data digits        # no data files needed

Recorded numbers: `nbs/experiments/bench_transfer.ipynb`.
"""
import argparse, statistics
import torch
from fastai.torch_core import set_seed
from _timers import EpochTimer
from rtl_fastai.data.all import task_dls
from rtl_fastai.models import PreActResNet18, SmallCNN
from rtl_fastai.callback.transfer import transfer_learner


def epoch_time(source, dls, n_retrain, cache, epochs):
    "(median training-epoch time, cache build time) for `epochs` epochs after one warm-up epoch."
    set_seed(0)
    timer = EpochTimer()
    learn = transfer_learner(source, dls, n_retrain=n_retrain, cache=cache, cbs=timer)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)                  # warm-up; builds the cache (timed by the callback: build_s)
        learn.fit(epochs, 1e-3)             # reuses it
    assert learn.feature_cache.active == bool(cache), learn.feature_cache.reason
    return statistics.median(timer.times), (learn.feature_cache.build_s or 0.) if cache else 0.


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='cifar10', choices=['cifar10', 'digits'])
    p.add_argument('--n-per-class', type=int, default=250, help='training images per target class (cifar10)')
    p.add_argument('--width', type=int, default=16, help='PreActResNet18 width (cifar10)')
    p.add_argument('--bs', type=int, default=128)
    p.add_argument('--epochs', type=int, default=3, help='timed epochs per setting (after one warm-up epoch)')
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.data == 'cifar10':
        dls = task_dls('cifar10', classes='target', n_per_class=a.n_per_class, bs=a.bs, normalize=False)
        source = PreActResNet18(n_out=6, width=a.width, stats=(dls.data.x_train.float().mean() / 255, 0.25)).eval()
        desc = f'CIFAR-10 vehicles, {len(dls.train_ds)} train images, PreActResNet18 width {a.width}'
    else:
        dls = task_dls('digits', classes='target', bs=a.bs, normalize=False)
        source = SmallCNN(widths=(32, 64, 128), n_out=5, stats=(0.3, 0.4)).eval()
        desc = f'digits 5-9, {len(dls.train_ds)} train images, SmallCNN widths (32, 64, 128)'
    print(f'{desc}; bs {a.bs}; {torch.get_num_threads()} thread(s); median of {a.epochs} training epochs\n')
    rows = {}
    for name, n_retrain, cache in [('head, no cache', 0, False), ('head, cache', 0, True),
                                   ('last block, no cache', 1, False), ('last block, cache', 1, True),
                                   ('full fine-tuning', 'all', False)]:
        rows[name] = epoch_time(source, dls, n_retrain, cache, a.epochs)
        t, b = rows[name]
        print(f'{name:22s} {t*1000:9.1f} ms/epoch' + (f'   (cache build {b*1000:.1f} ms, once)' if cache else ''))
    h0, (h1, hb) = rows['head, no cache'][0], rows['head, cache']
    l0, (l1, lb) = rows['last block, no cache'][0], rows['last block, cache']
    full = rows['full fine-tuning'][0]
    print('\nratios (higher = faster than the baseline, measured in this run)')
    print(f'  head epoch, no cache / cache:                {h0/h1:7.1f}x')
    for e in (a.epochs, 10, 30):
        print(f'  head, {e:2d} epochs incl. cache build, no cache / cache: {e*h0/(e*h1+hb):5.1f}x')
    print(f'  last-block epoch, no cache / cache:          {l0/l1:7.1f}x')
    print(f'  full fine-tuning / head (no cache):          {full/h0:7.1f}x')
    print(f'  full fine-tuning / head (cache):             {full/h1:7.1f}x')
    print(f'  full fine-tuning / last block (no cache):    {full/l0:7.1f}x')


if __name__ == '__main__': main()
