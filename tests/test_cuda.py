"""CUDA correctness (issue 15, part 1): attacks, `RobustAccuracy`/`robust_validate`, the adversarial-training
callbacks, the feature cache and feature distillation with the model, the data and the normalization statistics on
the GPU, under fastai's `MixedPrecision` (`to_fp16()` with its grad scaler, `to_bf16()`) and with `channels_last`.

Every test needs CUDA and is skipped without it. `--device cuda:N` (or `RTL_TEST_DEVICE=cuda:N`) picks the GPU;
the default is `cuda`. `RTL_TEST_CUDA_ON_CPU=1` runs the same tests on the CPU instead, to check the test code itself
on a machine without a GPU: fastai's `to_fp16()`/`to_bf16()` then train in float32 (their autocast is CUDA's), so
the reduced-dtype assertions of those modes are skipped there; explicit `torch.autocast('cpu', ...)` still reduces.

Tolerance for robust accuracies compared across precisions (`acc_tol`): two binomial standard errors of an
accuracy measured on `n` examples, plus one example (reduced precision moves the attack's trajectory, so the
examples near the decision boundary flip; the count of such flips is of the order of the sampling noise).
"""
import contextlib, copy, math, os
import pytest
import torch
import torch.nn as nn
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.metrics import accuracy
from rtl_fastai.core import normalize_stats, plain, NormalizeInput
from rtl_fastai.data.all import task_dls, ArrayData
from rtl_fastai.models import PreActResNet18
from rtl_fastai.attacks import pgd_attack, fgsm_attack, robust_eval_batch
from rtl_fastai.callback.adv_valid import RobustAccuracy
from rtl_fastai.callback.adv_train import PGDTraining, FreeAdvTraining, FastAdvTraining, TRADESTraining
from rtl_fastai.callback.transfer import transfer_learner, FeatureCache
from rtl_fastai.callback.distill import FeatureDistillation

ON_CPU = os.environ.get('RTL_TEST_CUDA_ON_CPU') == '1'
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU),
                                reason="CUDA-only test (no GPU here: torch.cuda.is_available() is False); run it on a GPU "
                                       "machine with `bash scripts/gpu_check.sh`, or set RTL_TEST_CUDA_ON_CPU=1 to check the test code on the CPU")
EPS = 0.1  # digits (8x8, grey levels of 1/16): an eps where PGD robust accuracy is informative
MODES = ['fp32', 'fp16', 'bf16']
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def acc_tol(p:float, n:int) -> float:
    "Two binomial standard errors of an accuracy `p` measured on `n` examples, plus one example."
    return 2*math.sqrt(max(p*(1-p), 1/n)/n) + 1/n


@contextlib.contextmanager
def exact_kernels():
    """Deterministic cuDNN kernels, and no TF32 (on by default for cuDNN convolutions on Ampere and later: a 10-bit
    mantissa, about 1e-3 relative): two runs that should give the same sums then give them up to fp32 rounding."""
    keys = [(torch.backends.cudnn, 'deterministic', True), (torch.backends.cudnn, 'benchmark', False),
            (torch.backends.cudnn, 'allow_tf32', False), (torch.backends.cuda.matmul, 'allow_tf32', False)]
    old = [getattr(m, k) for m, k, _ in keys]
    for m, k, v in keys: setattr(m, k, v)
    try: yield
    finally:
        for (m, k, _), v in zip(keys, old): setattr(m, k, v)


@pytest.fixture(scope='module')
def dev(device):
    "The GPU of the tests: `--device`/`RTL_TEST_DEVICE` if it names a CUDA device, else 'cuda' (the CPU under RTL_TEST_CUDA_ON_CPU=1)."
    if ON_CPU: return torch.device('cpu')
    return device if device.type == 'cuda' else torch.device('cuda')


@pytest.fixture(scope='module')
def gdls(dev):
    "Digits `DataLoaders` whose batches are on `dev` (450 validation images)."
    return task_dls('digits', bs=64, seed=0, device=dev)


@pytest.fixture(scope='module')
def gmodel(gdls, dev):
    "A `PreActResNet18` (width 16, BatchNorm) trained 4 epochs in float32 on `dev`; copy it before changing it."
    torch.manual_seed(0)
    learn = Learner(gdls, PreActResNet18(n_in=1, n_out=10, width=16), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 3e-3)
    assert learn.recorder.values[-1][2] > 0.9, learn.recorder.values  # a usable model for the comparisons below
    return learn.model.eval()


def fresh(model, dev, channels_last=False):
    m = copy.deepcopy(model).to(dev)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def reduced_expected(dev, mode, fastai_amp):
    "Whether the forward must run in a reduced dtype: fastai's MixedPrecision only reduces on CUDA."
    return mode != 'fp32' and (dev.type == 'cuda' or not fastai_amp)


def autocast(dev, mode):
    return contextlib.nullcontext() if mode == 'fp32' else torch.autocast(dev.type, dtype=DTYPES[mode])


def set_amp(learn, mode):
    if mode == 'fp16': learn.to_fp16()
    elif mode == 'bf16': learn.to_bf16()
    return learn


class Probe:
    "Forward hook on the first conv of `model`: the dtypes and devices of its outputs, and of its weight."
    def __init__(self, model):
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        self.dtypes, self.devices = set(), set()
        def hook(m, i, o): self.dtypes.add(o.dtype); self.devices.add(o.device); self.devices.add(m.weight.device)
        self.h = conv.register_forward_hook(hook)
    def remove(self): self.h.remove()


def check_reduced(probe, dev, mode, fastai_amp):
    assert probe.devices == {dev} or {d.type for d in probe.devices} == {dev.type}, probe.devices
    if reduced_expected(dev, mode, fastai_amp): assert DTYPES[mode] in probe.dtypes, (mode, probe.dtypes)
    elif mode == 'fp32': assert probe.dtypes == {torch.float32}, probe.dtypes


def on(t, dev): return t.device.type == dev.type and (dev.index is None or t.device.index == dev.index)


def pixel_dist(xa, x, stats, norm='linf'):
    "The largest distance (L-inf or per-example L2) between `xa` and `x` in pixels, and `xa` in pixels"
    sp = NormalizeInput.from_stats(stats) or NormalizeInput(0., 1.)
    sp = sp.to(x.device)
    d = sp.to_pixels(plain(xa).float()) - sp.to_pixels(plain(x).float())
    return (d.abs().amax() if norm == 'linf' else d.flatten(1).norm(dim=1).amax()).item(), sp.to_pixels(plain(xa).float())


def test_device_fixture(device):
    "`--device`/`RTL_TEST_DEVICE` give a `torch.device` (cpu by default)."
    assert isinstance(device, torch.device)


# -- attacks ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('mode', MODES)
def test_attacks_on_gpu(mode, channels_last, gdls, gmodel, dev):
    "PGD (L-inf, L2), FGSM and `robust_eval_batch` under autocast: outputs on the GPU, in the ball, forward in the reduced dtype."
    m = fresh(gmodel, dev, channels_last).eval()
    x, y = gdls.valid.one_batch()
    assert on(x, dev) and on(y, dev)
    if channels_last: x = x.contiguous(memory_format=torch.channels_last)
    gstats = tuple(s.to(dev) for s in normalize_stats(gdls))   # statistics on the GPU, and as the DataLoaders give them
    probe = Probe(m)
    with autocast(dev, mode):
        for stats in (gdls, gstats):
            for xa, eps, norm in ((pgd_attack(m, x, y, EPS, steps=5, stats=stats), EPS, 'linf'),
                                  (pgd_attack(m, x, y, 0.5, steps=5, norm='l2', stats=stats), 0.5, 'l2'),
                                  (fgsm_attack(m, x, y, EPS, stats=stats), EPS, 'linf')):
                assert on(xa, dev) and xa.dtype == x.dtype == torch.float32 and xa.shape == x.shape
                d, pa = pixel_dist(xa, x, stats, norm)
                assert pa.min() >= -1e-5 and pa.max() <= 1 + 1e-5
                assert 0 < d <= eps * (1 + 1e-4), (norm, d)
                assert torch.isfinite(xa).all()
            clean, robust = robust_eval_batch(m, x, y, eps=EPS, steps=5, stats=stats)
            assert on(clean, dev) and on(robust, dev) and bool((robust <= clean).all())
    probe.remove()
    check_reduced(probe, dev, mode, fastai_amp=False)
    assert all(p.dtype == torch.float32 and on(p, dev) for p in m.parameters())


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('mode', ['fp16', 'bf16'])
def test_robust_validate_close_to_fp32(mode, channels_last, gdls, gmodel, dev):
    "PGD-20 robust accuracy on all 450 validation images under autocast: within `acc_tol` of float32 (same seeds)."
    learn = Learner(gdls, fresh(gmodel, dev, channels_last))
    fp32 = learn.robust_validate(eps=EPS, steps=20, show_progress=False)
    probe = Probe(learn.model)
    with autocast(dev, mode): red = learn.robust_validate(eps=EPS, steps=20, show_progress=False)
    probe.remove()
    check_reduced(probe, dev, mode, fastai_amp=False)
    assert fp32['n'] == red['n'] == 450
    assert 0.15 < fp32['robust_acc'] < 0.9, fp32          # an eps where the number is informative
    tol = acc_tol(fp32['robust_acc'], fp32['n'])
    assert abs(red['robust_acc'] - fp32['robust_acc']) <= tol, (fp32, red, tol)
    assert abs(red['clean_acc'] - fp32['clean_acc']) <= acc_tol(fp32['clean_acc'], fp32['n']), (fp32, red)


def test_robust_metric_matches_robust_validate(gdls, gmodel, dev):
    "`RobustAccuracy` as a metric of `Learner.validate` counts what `robust_validate` counts (fp32, same seed)."
    learn = Learner(gdls, fresh(gmodel, dev), metrics=[accuracy, RobustAccuracy(eps=EPS, steps=10)])
    with exact_kernels():
        with learn.no_bar(): _, acc, rob = learn.validate()
        r = learn.robust_validate(eps=EPS, steps=10, show_progress=False)
    assert abs(rob - r['robust_acc']) <= 2/r['n'], (rob, r)   # same seeds; GPU rounding may flip an example
    assert abs(acc - r['clean_acc']) <= 1e-6


@pytest.mark.parametrize('mode', ['fp16', 'bf16'])
def test_robust_metric_in_fit_uses_reduced_precision(mode, gdls, gmodel, dev):
    """`RobustAccuracy` accumulates in the Recorder's after_batch, after fastai's MixedPrecision left its autocast
    (after_loss): it re-enters an autocast of the learner's dtype. On CUDA with the default `amp=None`; on the CPU
    (RTL_TEST_CUDA_ON_CPU=1), where fastai's autocast is CUDA's and does nothing, with `amp=True` (the same dtype,
    on the CPU)."""
    amp = None if dev.type == 'cuda' else True
    learn = set_amp(Learner(gdls, fresh(gmodel, dev), metrics=[RobustAccuracy(eps=EPS, steps=3, n_batches=1, amp=amp)]),
                    mode)
    probe = Probe(learn.model)
    seen = []
    class Rec(Callback):
        order = 49  # just before the Recorder accumulates the metrics
        def after_batch(self):
            if not self.training: probe.dtypes.clear()
    class After(Callback):
        order = 51
        def after_batch(self):
            if not self.training: seen.append(set(probe.dtypes))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4, cbs=[Rec(), After()])
    probe.remove()
    assert seen and DTYPES[mode] in seen[0] and torch.float32 not in seen[0], seen


# -- adversarial training -------------------------------------------------------------------------------------------
class GrabClean(Callback):
    "Keeps the clean batch, before the adversarial-training callbacks replace it (they have order 11)."
    order = MixedPrecision.order - 1
    def before_batch(self): self.x = plain(self.learn.xb[0]).detach().clone() if self.training else None

class GrabAdv(Callback):
    "Checks the batch the model trains on: device, dtype and distance to the clean batch (pixels, L-inf)."
    order = MixedPrecision.order + 5
    def __init__(self, clean): self.clean, self.dists, self.devs, self.dtypes = clean, [], set(), set()
    def before_batch(self):
        if not self.training: return
        xa = self.learn.xb[0]
        self.devs.add(xa.device); self.dtypes.add(xa.dtype)
        self.dists.append(pixel_dist(xa, self.clean.x, self.learn.dls)[0])


ADV = {'pgd': lambda: PGDTraining(EPS, steps=3), 'free': lambda: FreeAdvTraining(EPS, replays=2),
       'fast': lambda: FastAdvTraining(EPS), 'trades': lambda: TRADESTraining(EPS, steps=3)}

@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('method', list(ADV))
def test_adv_training_on_gpu(method, mode, gdls, gmodel, dev):
    "One epoch of each adversarial-training callback from the trained model, channels_last, under fastai's MixedPrecision."
    learn = set_amp(Learner(gdls, fresh(gmodel, dev, channels_last=True),
                            metrics=[accuracy, RobustAccuracy(eps=EPS, steps=5, n_batches=2)]), mode)
    cb, clean = ADV[method](), GrabClean()
    adv = GrabAdv(clean)
    probe = Probe(learn.model)
    scales, deltas = [], []
    class Scales(Callback):
        order = MixedPrecision.order + 1
        def after_step(self):
            if getattr(self.learn, 'scaler', None) is not None: scales.append(self.learn.scaler.get_scale())
        def after_batch(self):   # free AT's carried perturbation, during the fit (`after_fit` drops it)
            d = getattr(cb, 'delta', None)
            if self.training and d is not None: deltas.append((on(d, dev), d.abs().max().item()))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[cb, clean, adv, Scales()])
    probe.remove()
    vals = learn.recorder.values[-1]
    assert all(math.isfinite(v) for v in vals), vals
    assert vals[2] > 0.8 and 0 <= vals[3] <= vals[2], vals          # accuracy kept from the trained model
    check_reduced(probe, dev, mode, fastai_amp=True)
    assert all(p.dtype == torch.float32 and on(p, dev) for p in learn.model.parameters())
    assert {d.type for d in adv.devs} == {dev.type} and adv.dtypes == {torch.float32}, (adv.devs, adv.dtypes)
    assert adv.dists and max(adv.dists) <= EPS + 1e-4, max(adv.dists)
    if method != 'trades': assert max(adv.dists) > EPS/4, max(adv.dists)  # the batch really was perturbed
    else: assert cb.x_adv is None                                          # freed after each batch
    if method == 'free':
        assert deltas and all(o and m <= EPS + 1e-5 for o, m in deltas), deltas
        assert cb.delta is None   # nothing of the data travels with `learn.export()`
    if mode == 'fp16' and dev.type == 'cuda': assert scales and all(math.isfinite(s) and s > 0 for s in scales), scales


# -- feature cache and distillation ---------------------------------------------------------------------------------
@pytest.mark.parametrize('mode', MODES)
def test_feature_cache_on_gpu(mode, gdls, gmodel, dev):
    "Head + last block retrained with and without the cache on the GPU: the cache lives there and gives the same model."
    res = {}
    with exact_kernels(): _cache_runs(mode, gmodel, dev, res)
    (v1, p1), (v0, p0) = res[True], res[False]
    assert all(math.isfinite(v) for v in v1 + v0)
    n = len(gdls.valid.dataset)
    assert abs(v1[2] - v0[2]) <= acc_tol(v0[2], n), (v1, v0)
    if mode == 'fp32':   # the same model up to GPU rounding (kernels chosen per batch size)
        rel = max(((a - b).norm()/(b.norm() + 1e-12)).item() for a, b in zip(p1, p0))
        assert rel < 5e-2, rel


def _cache_runs(mode, gmodel, dev, res):
    for cache in (True, False):
        dls = task_dls('digits', bs=64, seed=0, device=dev)   # fresh: the same shuffles in both runs
        torch.manual_seed(0)
        learn = set_amp(transfer_learner(fresh(gmodel, dev, channels_last=True), dls, n_retrain=1, cache=cache,
                                         metrics=accuracy), mode)
        probe = Probe(learn.model)
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
        probe.remove()
        fc = next(c for c in learn.cbs if isinstance(c, FeatureCache))
        assert fc.active == cache, fc.reason
        if cache:
            assert fc.cached is not None and on(fc.cached, dev) and on(fc.targets, dev), fc.reason
            assert fc.cached.dtype == torch.float32   # built outside autocast: the same features as the fp32 prefix
        check_reduced(probe, dev, mode, fastai_amp=True)   # the full model (validation; training too without cache)
        assert fc._hook is None   # the injection hook is removed after the fit: the model is as it was
        assert all(on(p, dev) and p.dtype == torch.float32 for p in learn.model.parameters())
        res[cache] = (learn.recorder.values[-1], [p.detach().float().cpu() for p in learn.model.parameters()])


@pytest.mark.parametrize('precompute', [False, True])
@pytest.mark.parametrize('mode', MODES)
def test_distillation_on_gpu(mode, precompute, gdls, gmodel, dev):
    "Fine-tuning with `FeatureDistillation` on the GPU: source copy, penalty and precomputed features there, finite."
    learn = set_amp(Learner(gdls, fresh(gmodel, dev, channels_last=True), metrics=accuracy), mode)
    cb = FeatureDistillation(fresh(gmodel, 'cpu'), lam=5e-3, precompute=precompute)   # source given on the CPU: moved
    probe, src_probe = Probe(learn.model), Probe(cb.source)
    pens = []
    class Pen(Callback):
        order = 90
        def after_loss(self):
            if cb.batch_term is not None: pens.append(cb.batch_term)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[cb, Pen()])
    probe.remove(); src_probe.remove()
    vals = learn.recorder.values[-1]
    assert all(math.isfinite(v) for v in vals), vals
    assert vals[2] > 0.8, vals
    assert all(on(p, dev) for p in cb.source.parameters())
    check_reduced(src_probe, dev, mode, fastai_amp=True)   # the source's forward in the learner's precision too
    assert pens and all(on(p, dev) and p.dtype == torch.float32 and torch.isfinite(p) for p in pens)
    if precompute: assert cb._src_feats is not None and on(cb._src_feats, dev) and cb._src_feats.dtype == torch.float32
    check_reduced(probe, dev, mode, fastai_amp=True)


# -- data on the GPU ------------------------------------------------------------------------------------------------
def test_dataset_on_gpu(dev):
    "The in-memory data can live on the GPU: the same batches as from host memory, augmentation on the GPU."
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(96, 3, 32, 32, generator=g)*255).to(torch.uint8)
    y = torch.arange(96) % 4
    d = ArrayData(x[:64], y[:64], x[64:], y[64:], ['a', 'b', 'c', 'd'])
    host = task_dls(d, bs=16, seed=0, device=dev)
    gpu = task_dls(d, bs=16, seed=0, device=dev, data_device='device')
    assert all(on(t, dev) for ds in (gpu.train.dataset, gpu.valid.dataset) for t in (ds.x, ds.y))
    for dl_h, dl_g in ((host.train, gpu.train), (host.valid, gpu.valid)):
        bh, bg = list(dl_h), list(dl_g)
        assert len(bh) == len(bg) > 0
        for (xh, yh), (xg, yg) in zip(bh, bg):
            assert on(xg, dev) and on(yg, dev) and xg.dtype == torch.float32
            torch.testing.assert_close(plain(xg), plain(xh)); assert torch.equal(plain(yg), plain(yh))
    aug = task_dls(d, bs=16, seed=0, device=dev, augment=True, data_device=dev)
    assert on(aug.train.dataset.x, dev)
    xb, yb = aug.train.one_batch()
    assert on(xb, dev) and xb.shape == (16, 3, 32, 32) and xb.dtype == torch.float32


def test_task_dls_from_arrays_on_the_gpu(dev):
    "An `ArrayData` whose tensors already live on the GPU: class selection, subsampling and the statistics work there."
    from rtl_fastai.data.arrays import load_digits_data, channel_stats
    d = load_digits_data()
    g = ArrayData(*(t.to(dev) for t in (d.x_train, d.y_train, d.x_valid, d.y_valid)), d.classes, d.name)
    dls = task_dls(g, classes='source', n_per_class=20, bs=16, device=dev, data_device='device')
    x, y = dls.one_batch()
    assert on(x, dev) and on(y, dev) and len(dls.train_ds) == 100 and dls.vocab == list('01234')
    ref = task_dls(d, classes='source', n_per_class=20, bs=16, device='cpu')
    torch.testing.assert_close(dls.stats[0].cpu(), ref.stats[0]); torch.testing.assert_close(dls.stats[1].cpu(), ref.stats[1])
    assert [t.device.type for t in channel_stats(g.x_train)] == ['cpu', 'cpu']


def test_robust_validate_moves_a_cpu_model_to_the_data(gdls, gmodel, dev):
    "A learner whose model is still on the CPU (fresh from a checkpoint): `robust_validate` moves it, as `validate` does"
    learn = Learner(gdls, copy.deepcopy(gmodel).cpu(), metrics=accuracy)
    r = learn.robust_validate(eps=EPS, steps=3, n_batches=1, show_progress=False)
    assert 0 <= r['robust_acc'] <= r['clean_acc'] and on(next(learn.model.parameters()), dev)


def test_report_attacks_in_float32(gdls, gmodel, dev):
    "`robustness_report` of a `to_fp16()` learner: every attack in float32 (torchattacks' run so), on the GPU"
    import warnings
    import rtl_fastai.report  # noqa: F401  (Learner.robustness_report)
    learn = set_amp(Learner(gdls, fresh(gmodel, dev), metrics=accuracy), 'fp16')
    probe = Probe(learn.model)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.robustness_report(eps=EPS, steps=3, n_batches=1, square_queries=None, eps_factors=(), restarts=1,
                                show=False)
    probe.remove()
    assert probe.dtypes == {torch.float32} and {d.type for d in probe.devices} == {dev.type}, (probe.dtypes, probe.devices)
