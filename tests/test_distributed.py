"""Distributed training (issue 8, part 4): our callbacks and `RobustAccuracy` under fastai's `distrib_ctx`.

`tests/distrib_script.py` runs in 2 CPU processes (gloo) started by torch's launcher (`torchrun`), one
`OMP_NUM_THREADS=1` thread each: 1 epoch of `PGDTraining` on digits with `accuracy` and two `RobustAccuracy`
metrics (eps=0.2, 5 PGD steps), on a validation set of 449 images, so `DistributedDL` pads the second process's
share with one repeated image. Then this process evaluates the final weights on the same 449 images alone.

How the comparison is made exact. Each process attacks its own share in its own batches, and the metric seeds
the random starts per batch (`seed + batch number`), so with random starts the draws of an example differ from
those it gets in a single process: the two values are two draws of the same estimator, not equal numbers.
- With `random_start=False` PGD is deterministic and each example's attack depends only on that example (the
  model is in eval mode), so rank 0's value must equal the single-process value on the 449 images.
- With random starts, we replay in this one process the shares the 2 processes saw (`DistributedDL` with
  `rank`/`world_size` given) with the same per-process seeds and sum the counts: this must give rank 0's value
  exactly, which checks the sum over processes and that the padding image is not counted.
"""
import json, os, socket, subprocess, sys, time
from pathlib import Path
import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).parent
TIMEOUT = 170  # seconds: the whole launch (CI budget: under 3 minutes)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    pytest.importorskip('accelerate', reason="fastai's distrib_ctx needs `accelerate` (in the dev extra: pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp('distrib')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(_free_port()), str(HERE/'distrib_script.py'), str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    res = [json.loads((out/f'rank{r}.json').read_text()) for r in range(2)]
    print(f"2-process run: {time.perf_counter()-t0:.1f} s")
    return out, res


@pytest.fixture(scope='module')
def single(runs):
    "The final weights in a single-process Learner on the same 449 validation images."
    from distrib_script import digits_dls
    from fastai.learner import Learner
    from rtl_fastai.models import SmallCNN
    torch.set_num_threads(1)
    dls = digits_dls()
    model = SmallCNN(n_in=1, n_out=10)
    model.load_state_dict(torch.load(runs[0]/'model.pt', weights_only=True))
    return Learner(dls, model.eval())


def test_launch(runs):
    _, (r0, r1) = runs
    assert (r0['rank'], r1['rank'], r0['world'], r0['backend']) == (0, 1, 2, 'gloo')
    assert r0['weights'] == r1['weights']  # DDP kept the processes' models identical


def test_robust_accuracy_gathered(runs):
    "Every process reports the counts of the whole validation set, the padding image not counted."
    from distrib_script import N_VALID, ATTACKS
    _, (r0, r1) = runs
    for k in ATTACKS:
        assert r0['metrics'][k]['total'] == N_VALID
        assert r0['metrics'][k] == r1['metrics'][k]
        assert r0['robust_validate'][k]['n'] == N_VALID
        # robust_validate inside distrib_ctx shards the DataLoader like the metric does during fit
        assert r0['robust_validate'][k]['robust_acc'] == r0['metrics'][k]['value']
        assert r0['robust_validate'][k]['clean_acc'] == r0['metrics'][k]['clean']
    names = ['train_loss', 'valid_loss', 'accuracy', 'pgd5_acc@0.2', 'pgd5_acc@0.2']
    assert len(r0['recorder']) == len(names)
    assert r0['recorder'][3] == r0['metrics']['fixed']['value']  # the fit table shows the gathered value
    assert r0['recorder'][4] == r0['metrics']['random']['value']


def test_equals_single_process(runs, single):
    "Deterministic PGD (`random_start=False`): rank 0's value is the single-process value on the same images."
    from distrib_script import ATTACKS, N_VALID
    _, (r0, _) = runs
    ref = single.robust_validate(show_progress=False, **ATTACKS['fixed'])
    assert ref['n'] == N_VALID
    assert r0['metrics']['fixed']['value'] == ref['robust_acc']
    assert r0['metrics']['fixed']['clean'] == ref['clean_acc']
    assert r0['metrics']['random']['clean'] == ref['clean_acc']
    # and outside distrib_ctx each process evaluates all of the validation set itself: the same numbers
    assert r0['robust_validate_local'] == ref
    assert 0 < ref['robust_acc'] < ref['clean_acc']  # the attack does something, on a model that learned something


def test_random_starts_replayed(runs, single):
    "Random starts: replaying each process's share with its seeds in one process gives rank 0's value exactly."
    from distrib_script import ATTACKS, N_VALID
    from fastai.distributed import DistributedDL
    from rtl_fastai.data.all import normalize_stats
    from rtl_fastai.callback.adv_valid import RobustAccuracy
    _, (r0, _) = runs
    dls, stats = single.dls, normalize_stats(single.dls)
    correct = clean = total = 0
    for rank in range(2):
        ddl, met = DistributedDL(dls.valid, rank=rank, world_size=2), RobustAccuracy(**ATTACKS['random'])
        for xb, yb in ddl: met._update(single.model, xb, yb, stats, ddl)
        correct, clean, total = correct + int(met.correct), clean + int(met.clean_correct), total + int(met.total)
    assert total == N_VALID
    assert r0['metrics']['random']['value'] == torch.tensor(correct).float().div(total).item()
    assert r0['metrics']['random']['clean'] == torch.tensor(clean).float().div(total).item()


def test_transfer_and_distill(runs):
    "`transfer_learner` (FreezeBlocks; the feature cache turns itself off) and `FeatureDistillation` fit under distrib_ctx."
    _, (r0, r1) = runs
    for r in (r0, r1):
        for k in ('transfer', 'distill'): assert r[k]['ok'], r[k].get('error')
        assert r['transfer']['frozen_unchanged'] and r['transfer']['n_frozen'] > 0
        assert r['transfer']['cache'].startswith('distributed training')
    assert r0['transfer']['metrics']['accuracy'] == r1['transfer']['metrics']['accuracy']
    assert r0['distill']['metrics']['accuracy'] == r1['distill']['metrics']['accuracy']


def test_distill_warm_start_under_ddp(runs):
    "The warm start under DDP: refused with the fix by default (DDP refuses parameters without gradients), and with "
    "`find_unused_parameters=True` the body's gradients are averaged after it: the same body on both ranks"
    _, (r0, r1) = runs
    for r in (r0, r1):
        assert not r['warm_default']['ok'] and 'find_unused_parameters=True' in r['warm_default']['error']
        assert r['warm_unused']['ok'], r['warm_unused'].get('error')
    assert r0['warm_unused']['body'] == r1['warm_unused']['body']


def test_free_adv_training_replays_each_share(runs):
    "FreeAdvTraining wraps the loader after fastai's DistributedTrainer: each process replays its own share m=2 times."
    _, (r0, r1) = runs
    for r in (r0, r1):
        assert r['free']['ok'], r['free'].get('error')
        assert r['free']['n_train'] == 2*r['n_train'] > 0   # `n_train`: the batches of the plain distributed fit


def test_normalize_stats_under_distrib_ctx(runs):
    assert runs[1][0]['spy_stats_ok']
