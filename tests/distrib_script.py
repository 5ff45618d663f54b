"""Run by `tests/test_distributed.py` in every process of a 2-process gloo group (CPU):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 tests/distrib_script.py OUT_DIR

`accelerate launch --cpu` starts a single process, so on CPUs use torchrun; on GPUs `accelerate launch --num_processes N`.

Trains a SmallCNN on digits for 1 epoch with `PGDTraining` inside `learn.distrib_ctx()`, with `accuracy` and
`RobustAccuracy` as metrics, on a validation set of 449 items (odd: `DistributedDL` pads the last share with a
repeated item). Then `robust_validate` inside the context, and quick fits of `transfer_learner` (FreezeBlocks) and
`FeatureDistillation` under `distrib_ctx`. Each process writes `OUT_DIR/rank{r}.json`; rank 0 also writes the final
weights to `OUT_DIR/model.pt`, which the test evaluates in a single process.
"""
import json, sys, time, traceback
from pathlib import Path
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.metrics import accuracy
from fastai.distributed import rank_distrib, num_distrib  # patches Learner.distrib_ctx
from rtl_fastai.data.all import task_dls, normalize_stats, ArrayDataset
from rtl_fastai.models import SmallCNN, model_blocks
import rtl_fastai.distributed  # noqa: F401  (makes fastai's DistributedDL work under gloo)
from rtl_fastai.callback.adv_valid import RobustAccuracy, robust_validate
from rtl_fastai.callback.adv_train import PGDTraining, FreeAdvTraining
from rtl_fastai.callback.transfer import transfer_learner, FreezeBlocks, FeatureCache
from rtl_fastai.callback.distill import FeatureDistillation

N_VALID = 449  # odd, so that 2 processes need one padding item
ATTACKS = dict(fixed=dict(eps=0.2, steps=5, random_start=False), random=dict(eps=0.2, steps=5, random_start=True, seed=0))


def digits_dls():
    "Digits with an odd validation set (the first 449 of the 450 validation images), on the CPU."
    dls = task_dls('digits', bs=64, seed=0, device='cpu')
    v = dls.valid.dataset
    return DataLoaders(dls.train, dls.valid.new(ArrayDataset(v.x[:N_VALID], v.y[:N_VALID], v.vocab, v.split_idx)))


class StatsSpy(Callback):
    "Record the normalization stats our callbacks read from `learn.dls` during a distributed fit."
    order = 50
    def before_fit(self): self.stats, self.n_train = None, 0
    def before_batch(self):
        if self.stats is None: self.stats = normalize_stats(self.learn.dls)
        if self.training: self.n_train += 1


def main(out):
    out = Path(out)
    rank, world = rank_distrib(), num_distrib()
    res = dict(rank=rank, world=world)
    t0 = time.perf_counter()
    dls = digits_dls()
    stats = normalize_stats(dls)
    torch.manual_seed(0)
    ras = {k: RobustAccuracy(**kw) for k, kw in ATTACKS.items()}
    spy = StatsSpy()
    learn = Learner(dls, SmallCNN(n_in=1, n_out=10), metrics=[accuracy, *ras.values()],
                    cbs=[PGDTraining(eps=0.2, steps=3, stats=stats), spy])
    with learn.no_bar(), learn.distrib_ctx(sync_bn=False, cpu=True):  # CPU: gloo, no SyncBatchNorm
        res['backend'] = dist.get_backend()
        learn.fit(1, 3e-3)
        res['recorder'] = [float(v) for v in learn.recorder.values[-1]]
        res['metrics'] = {k: dict(value=m.value, clean=m.clean_value, total=int(m.total)) for k, m in ras.items()}
        res['spy_stats_ok'] = spy.stats is not None and all(torch.equal(a, b) for a, b in zip(spy.stats, stats))
        res['n_train'] = spy.n_train
        res['robust_validate'] = {k: robust_validate(learn, show_progress=False, **kw) for k, kw in ATTACKS.items()}
    res['robust_validate_local'] = robust_validate(learn, show_progress=False, **ATTACKS['fixed'])  # outside: all of dls.valid
    if rank == 0: torch.save(learn.model.state_dict(), out/'model.pt')
    res['main_s'] = time.perf_counter() - t0

    res['weights'] = [float(v.double().sum()) for v in learn.model.state_dict().values()]  # the same on every rank?

    # our other callbacks under distrib_ctx: a quick fit each
    for name, make in (('transfer', lambda: transfer_learner(learn.model, dls, n_retrain=1, metrics=accuracy)),
                       ('distill', lambda: Learner(dls, SmallCNN(n_in=1, n_out=10), metrics=accuracy,
                                                   cbs=FeatureDistillation(learn.model, lam=5e-3))),
                       ('free', lambda: Learner(dls, SmallCNN(n_in=1, n_out=10), metrics=accuracy,
                                                cbs=[FreeAdvTraining(0.2, replays=2), StatsSpy()]))):
        try:
            t1 = time.perf_counter()
            l2 = make()
            fb = next((cb for cb in l2.cbs if isinstance(cb, FreezeBlocks)), None)
            frozen = lambda: [v.clone() for m in model_blocks(l2.model).all[:fb.n_frozen] for v in m.state_dict().values()]
            if fb is not None: before = frozen()
            with l2.no_bar(), l2.distrib_ctx(sync_bn=False, cpu=True): l2.fit(1, 1e-3)
            r = res[name] = dict(ok=True, s=time.perf_counter() - t1,
                                 metrics=dict(zip(l2.recorder.metric_names[1:-1], map(float, l2.recorder.values[-1]))))
            sp = next((cb for cb in l2.cbs if isinstance(cb, StatsSpy)), None)
            if sp is not None: r['n_train'] = sp.n_train
            if fb is not None:
                r['n_frozen'] = fb.n_frozen
                r['frozen_unchanged'] = all(torch.equal(x, y) for x, y in zip(before, frozen()))
                r['cache'] = next(cb for cb in l2.cbs if isinstance(cb, FeatureCache)).reason
        except Exception as e:
            res[name] = dict(ok=False, error=''.join(traceback.format_exception(e))[-3000:])
    # FeatureDistillation's warm start: the body gets no gradient, which DDP takes only when it looks for unused
    # parameters; asked for, the body's gradients are averaged after the warm start (the same weights on each rank)
    from accelerate import DistributedDataParallelKwargs
    for name, kw in (('warm_default', {}), ('warm_unused', dict(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]))):
        l2 = Learner(dls, SmallCNN(n_in=1, n_out=10), metrics=accuracy, cbs=FeatureDistillation(learn.model, lam=5e-3, warmup_epochs=1))
        try:
            with l2.no_bar(), l2.no_logging(), l2.distrib_ctx(sync_bn=False, cpu=True, **kw): l2.fit(2, 1e-3)
            res[name] = dict(ok=True, body=float(l2.model.stem.conv.weight.double().sum()))
        except Exception as e: res[name] = dict(ok=False, error=str(e)[-600:])
    (out/f'rank{rank}.json').write_text(json.dumps(res, indent=1))


if __name__ == '__main__': main(sys.argv[1])
