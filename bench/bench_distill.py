"""Step time of fine-tuning with `FeatureDistillation` against plain fine-tuning, measured side by side in one run.

Three configurations train the same model on the same batches:
  plain       fine-tuning without the penalty
  per-batch   FeatureDistillation: one source forward (float32, no grad) per batch
  precomputed FeatureDistillation(precompute=True): source features computed once, looked up by index

Each round runs one training epoch of every configuration in turn (interleaved, so a load change on a shared
machine hits all of them); the time of a training batch is measured from `before_batch` to `after_batch` (forward,
loss, penalty, backward, optimizer step). Reported: median batch time per configuration and its ratio to plain
(targets: <= 1.4x per batch, <= 1.1x precomputed), plus the one-time cost of precomputing the features.

    python bench/bench_distill.py                       # PreActResNet18 width 16, 32x32x3, bs 64
    python bench/bench_distill.py --model smallcnn      # digits-size SmallCNN (8x8x1)

Recorded numbers: `nbs/experiments/bench_transfer.ipynb`.
"""
import argparse, time, statistics
from copy import deepcopy
import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from rtl_fastai.data.all import ArrayData, task_dls
from rtl_fastai.models import SmallCNN, PreActResNet18, replace_head
from rtl_fastai.callback.distill import FeatureDistillation


class BatchTimer(Callback):
    "Starts the clock before every other callback's `before_batch`."
    order = -100
    def before_fit(self): self.times = []
    def before_batch(self):
        if self.training: self.t0 = time.perf_counter()


class _LastTimer(Callback):
    "Stops the clock after every other callback's `after_batch`."
    order = 100
    def __init__(self, timer): self.timer = timer
    def after_batch(self):
        if self.training: self.timer.times.append(time.perf_counter() - self.timer.t0)


def synthetic(n, c, size, n_cls, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayData(torch.rand(n, c, size, size, generator=g), torch.randint(0, n_cls, (n,), generator=g),
                     torch.rand(64, c, size, size, generator=g), torch.randint(0, n_cls, (64,), generator=g),
                     [str(i) for i in range(n_cls)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', choices=['preact', 'smallcnn'], default='preact')
    ap.add_argument('--width', type=int, default=16, help='PreActResNet18 width')
    ap.add_argument('--n', type=int, default=1024, help='training examples')
    ap.add_argument('--bs', type=int, default=64)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model == 'preact':
        data = synthetic(a.n, 3, 32, 4)
        source = PreActResNet18(n_out=6, width=a.width).eval()
    else:
        data = synthetic(a.n, 1, 8, 5)
        source = SmallCNN(n_out=5, widths=(16, 32, 64)).eval()
    dls = task_dls(data, bs=a.bs)  # no augmentation: precompute is allowed
    configs = {'plain': lambda: [],
               'per-batch': lambda: [FeatureDistillation(source, lam=5e-3)],
               'precomputed': lambda: [FeatureDistillation(source, lam=5e-3, precompute=True)]}
    learners = {}
    for name in configs:
        set_seed(0)
        learners[name] = Learner(dls, replace_head(deepcopy(source), dls.c), loss_func=CrossEntropyLossFlat())
    times = {k: [] for k in configs}
    pre_cost = None
    for r in range(a.rounds + 1):  # round 0 is a warm-up, not counted
        for name, make in configs.items():
            learn, timer = learners[name], BatchTimer()
            cbs = make()
            t0 = time.perf_counter()
            with learn.no_bar(), learn.no_logging():
                learn.fit(1, 1e-3, cbs=[timer, _LastTimer(timer), *cbs])
            if name == 'precomputed' and r == 0:  # the first fit precomputes (later fits of a callback reuse it; new ones recompute)
                pre_cost = time.perf_counter() - t0 - sum(timer.times)
            if r > 0: times[name] += timer.times
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {a.model}{f' width {a.width}' if a.model == 'preact' else ''}, {a.n} examples, bs {a.bs}, "
          f"{torch.get_num_threads()} thread(s), {a.rounds} interleaved rounds, {len(times['plain'])} batches each")
    for k in configs:
        print(f"  {k:12s} median {1000 * med[k]:8.2f} ms/batch   ratio to plain {med[k] / med['plain']:.3f}x")
    print(f"  first fit of 'precomputed' outside its batches (precompute + validation): {pre_cost:.2f} s")
    print(f"RATIOS per-batch {med['per-batch'] / med['plain']:.3f}x (target <= 1.4x), "
          f"precomputed {med['precomputed'] / med['plain']:.3f}x (target <= 1.1x)")


if __name__ == '__main__':
    main()
