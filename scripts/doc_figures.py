#!/usr/bin/env python
"""The figures the notebooks' prose quotes without a cell of their own, each measured by one command:
    OMP_NUM_THREADS=1 python scripts/doc_figures.py digits_eps      # nbs/04_callback.adv_train: why eps=0.2 on digits
    OMP_NUM_THREADS=1 python scripts/doc_figures.py alpha_default   # nbs/02_attacks: the old PGD-20 step, 2.5*eps/steps
    OMP_NUM_THREADS=1 python scripts/doc_figures.py wrn_cost        # the paper tutorial's CPU cost of WRN-32-10"""
import time, warnings
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
import torch
from fastcore.script import call_parse
from fastai.vision.all import Learner, accuracy, set_seed

def _digits(n_out=10, epochs=5, cbs=(), classes=None, seed=0):
    from rtl_fastai.data.all import task_dls
    from rtl_fastai.models import SmallCNN
    set_seed(seed)
    dls = task_dls('digits', bs=64, seed=seed, **({} if classes is None else dict(classes=classes)))
    learn = Learner(dls, SmallCNN(n_out=dls.c), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 1e-2, cbs=list(cbs))
    return learn

def digits_eps():
    "A naturally trained SmallCNN on all ten digits: clean and PGD-20 accuracy at eps 0.1 and 0.2 (step eps/4)"
    from rtl_fastai.callback.adv_valid import robust_validate
    learn = _digits()
    for eps in (0.1, 0.2):
        set_seed(0)
        r = robust_validate(learn, eps=eps, steps=20, alpha=eps/4, show_progress=False)
        print(f"natural SmallCNN, all ten digits ({r['n']} validation images): clean {r['clean_acc']:.3f}, "
              f"PGD-20 at eps {eps}: {r['robust_acc']:.3f}")

def alpha_default():
    "PGD-20 at eps 0.2 on a PGD-7-trained digits SmallCNN (source classes 0-4): step eps/4 against the old 2.5*eps/20"
    from rtl_fastai.callback.adv_valid import robust_validate
    from rtl_fastai.callback.adv_train import PGDTraining
    learn = _digits(epochs=8, cbs=[PGDTraining(eps=0.2, steps=7)], classes='source')
    res = {}
    for name, a in (('eps/4', 0.2/4), ('2.5*eps/20', 2.5*0.2/20)):
        set_seed(0)
        res[name] = robust_validate(learn, eps=0.2, steps=20, alpha=a, show_progress=False)
        print(f"PGD-20 at eps 0.2, step {name} = {a:.4f}: robust accuracy {res[name]['robust_acc']:.3f} "
              f"(clean {res[name]['clean_acc']:.3f}, {res[name]['n']} images)")
    print(f"the old step overstates robust accuracy by {100*(res['2.5*eps/20']['robust_acc'] - res['eps/4']['robust_acc']):.1f} points")

def wrn_cost():
    "WRN-32-10: seconds of one forward + backward pass on 8 CIFAR images (best of 3), and GFLOP of one forward per image"
    from torch.utils.flop_counter import FlopCounterMode
    from rtl_fastai.models import WideResNet
    torch.manual_seed(0)
    m, x = WideResNet(depth=32, widen=10), torch.rand(8, 3, 32, 32)
    ts = []
    for _ in range(3):
        t = time.perf_counter(); m(x).sum().backward(); ts.append(time.perf_counter() - t); m.zero_grad()
    with FlopCounterMode(display=False) as fc: m(x[:1])
    print(f"WRN-32-10, {torch.get_num_threads()} thread(s): forward + backward on 8 images {min(ts):.1f} s (best of 3); "
          f"{fc.get_total_flops()/1e9:.1f} GFLOP per image per forward; {sum(p.numel() for p in m.parameters())/1e6:.1f} M parameters")

@call_parse
def main(what:str): # 'digits_eps', 'alpha_default' or 'wrn_cost'
    "Measure one figure the docs quote"
    fs = dict(digits_eps=digits_eps, alpha_default=alpha_default, wrn_cost=wrn_cost)
    if what not in fs: raise SystemExit(f"doc_figures: give one of {list(fs)}, got {what!r}")
    fs[what]()
