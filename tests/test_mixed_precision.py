"""Mixed precision (issue 8, part 3).

fastai 2.8.7's `MixedPrecision` (`to_fp16()`, `to_bf16()`) hard-codes `autocast('cuda')`, which PyTorch disables
(with a warning) on a machine without a GPU: on CPU those learners train in float32. Mixed precision that really
runs on CPU is bfloat16 autocast, `torch.autocast('cpu', dtype=torch.bfloat16)`: `CPUAutocast` below is
`MixedPrecision` with that autocast (a test helper; on the device of the data, so with `RTL_TEST_DEVICE=cuda` it is
CUDA bf16 autocast), or with float16 autocast and a real `GradScaler` (its scaled, skipped and unscaled steps run on
the CPU too). Every callback and attack is checked under both, and under
`to_fp16()`/`to_bf16()` (which must at least run on CPU, and do real mixed precision on a GPU); PGD robust
accuracy under CPU bf16 autocast is within 2 points of float32 on the digits model.
"""
import warnings
import pytest
import torch
import torch.nn as nn
from fastcore.foundation import L
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.metrics import accuracy
from rtl_fastai.data.all import task_dls
from rtl_fastai.models import SmallCNN
from rtl_fastai.core import NormalizeInput
from rtl_fastai.attacks import pgd_attack, fgsm_attack, robust_eval_batch
from rtl_fastai.callback.adv_valid import RobustAccuracy
from rtl_fastai.callback.adv_train import PGDTraining, FreeAdvTraining, FastAdvTraining, TRADESTraining
from rtl_fastai.callback.transfer import transfer_learner
from rtl_fastai.callback.distill import FeatureDistillation

torch.set_num_threads(1)


class CPUAutocast(MixedPrecision):
    ("fastai's `MixedPrecision` with `dtype` autocast on the data's device, CPU included: float16 with a real "
     "`GradScaler`, bfloat16 without one (it has the range of fp32)")
    def __init__(self, dtype=torch.bfloat16):
        super().__init__(amp_mode='fp16' if dtype == torch.float16 else 'bf16'); self.dtype = dtype
    def before_fit(self):
        dev = self.dls.device.type if self.dls.device is not None else 'cpu'
        self.autocast, self.scales = torch.autocast(dev, dtype=self.dtype), L()
        self.learn.scaler = torch.amp.GradScaler(dev, **(self.kwargs if self.dtype == torch.float16 else dict(enabled=False)))


class DtypeProbe:
    "Forward hook on the first conv: the dtypes of its outputs."
    def __init__(self, model):
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        self.dtypes, self.h = set(), conv.register_forward_hook(lambda m, i, o: self.dtypes.add(o.dtype))
    def remove(self): self.h.remove()


def _model(digits_model):
    m = SmallCNN(); m.load_state_dict(digits_model.state_dict()); return m


def _setups(dls, src):
    ra = lambda: RobustAccuracy(0.1, steps=3, n_batches=1)
    return {
        'PGDTraining': (Learner(dls, _model(src), metrics=[accuracy, ra()]), [PGDTraining(0.1, steps=2)]),
        'FreeAdvTraining': (Learner(dls, _model(src), metrics=[accuracy, ra()]), [FreeAdvTraining(0.1, replays=2)]),
        'FastAdvTraining': (Learner(dls, _model(src), metrics=[accuracy, ra()]), [FastAdvTraining(0.1)]),
        'TRADESTraining': (Learner(dls, _model(src), metrics=[accuracy, ra()]), [TRADESTraining(0.1, steps=2)]),
        'transfer': (transfer_learner(_model(src), dls, n_retrain=1, cache=False, metrics=[accuracy, ra()]), []),
        'transfer-cache': (transfer_learner(_model(src), dls, n_retrain=1, cache=True, metrics=[accuracy, ra()]), []),
        'FeatureDistillation': (Learner(dls, _model(src), metrics=[accuracy, ra()]), [FeatureDistillation(_model(src), warmup_epochs=1)]),
    }

SETUP_NAMES = ['PGDTraining', 'FreeAdvTraining', 'FastAdvTraining', 'TRADESTraining', 'transfer', 'transfer-cache', 'FeatureDistillation']


@pytest.fixture
def small_dls(device):
    "A fresh quarter of the digits training set (fast epochs), all of its validation set, on `device`."
    from rtl_fastai.data.all import load_digits_data, subsample
    return task_dls(subsample(load_digits_data(), 30), bs=64, seed=0, device=device)


@pytest.mark.parametrize('mode', ['cpu-bf16', 'cpu-fp16', 'to_bf16', 'to_fp16'])
@pytest.mark.parametrize('setup', SETUP_NAMES)
def test_callbacks_under_mixed_precision(setup, mode, small_dls, digits_model):
    learn, cbs = _setups(small_dls, digits_model)[setup]
    if mode == 'cpu-bf16': learn.add_cb(CPUAutocast(torch.bfloat16))
    elif mode == 'cpu-fp16': learn.add_cb(CPUAutocast(torch.float16))
    elif mode == 'to_bf16': learn.to_bf16()
    else: learn.to_fp16()
    probe = DtypeProbe(learn.model)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*CUDA is not available.*')  # to_fp16/to_bf16 on a CPU-only machine
        warnings.filterwarnings('ignore', message='.*torch.cuda.amp.GradScaler is enabled, but CUDA is not available.*')
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2 if setup.startswith('transfer') else 1e-3, cbs=cbs)  # a new random head: larger lr
    probe.remove()
    loss, acc, rob = learn.recorder.values[-1][1:4]
    assert all(torch.isfinite(torch.tensor(v)) for v in learn.recorder.values[-1]), learn.recorder.values
    assert acc > 0.8 and 0 <= rob <= acc, learn.recorder.values   # from the trained digits model
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    if mode.startswith('cpu-') or small_dls.device.type == 'cuda': assert torch.bfloat16 in probe.dtypes or torch.float16 in probe.dtypes, probe.dtypes
    else: assert probe.dtypes == {torch.float32}  # on CPU, fastai's MixedPrecision runs in float32 (documented)


def test_attacks_inside_cpu_autocast(digits_dls, digits_model):
    x, y = digits_dls.valid.one_batch()
    m = _model(digits_model).eval()
    p = NormalizeInput.from_stats(digits_dls).to_pixels(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        for xa in (pgd_attack(m, x, y, 0.1, steps=5, stats=digits_dls), pgd_attack(m, x, y, 0.5, steps=5, norm='l2', stats=digits_dls),
                   fgsm_attack(m, x, y, 0.1, stats=digits_dls)):
            assert xa.dtype == x.dtype and xa.shape == x.shape
            pa = NormalizeInput.from_stats(digits_dls).to_pixels(xa)
            assert pa.min() >= -1e-5 and pa.max() <= 1 + 1e-5
        d = (NormalizeInput.from_stats(digits_dls).to_pixels(pgd_attack(m, x, y, 0.1, steps=5, stats=digits_dls)) - p).abs().max()
        assert d <= 0.1 + 1e-5
        d2 = (NormalizeInput.from_stats(digits_dls).to_pixels(pgd_attack(m, x, y, 0.5, steps=5, norm='l2', stats=digits_dls))
              - p).flatten(1).norm(dim=1).max()
        assert 0 < d2 <= 0.5 * (1 + 1e-4)
        clean, robust = robust_eval_batch(m, x, y, eps=0.1, steps=5, stats=digits_dls)
        assert robust.sum() <= clean.sum() and clean.float().mean() > 0.9


def test_pgd_bf16_close_to_fp32(digits_dls, digits_model):
    "PGD-20 robust accuracy on the whole digits validation set: CPU bf16 autocast within 2 points of float32."
    learn = Learner(digits_dls, _model(digits_model))
    fp32 = learn.robust_validate(eps=0.1, steps=20, show_progress=False)
    with torch.autocast(digits_dls.device.type, dtype=torch.bfloat16):
        bf16 = learn.robust_validate(eps=0.1, steps=20, show_progress=False)
    assert fp32['n'] == bf16['n'] == 450
    assert 0.2 < fp32['robust_acc'] < 0.9, fp32  # an eps where the number is informative
    assert abs(bf16['robust_acc'] - fp32['robust_acc']) <= 0.02, (fp32, bf16)
    assert abs(bf16['clean_acc'] - fp32['clean_acc']) <= 0.02, (fp32, bf16)


@pytest.mark.parametrize('amp', [None, False])
def test_robust_metric_follows_learner_precision(small_dls, digits_model, amp):
    """`RobustAccuracy` accumulates in `after_batch`, after `MixedPrecision` left its autocast: with `amp=None` it
    attacks in the learner's dtype again (here bf16 autocast on the data's device), with `amp=False` in float32."""
    learn = Learner(small_dls, _model(digits_model), metrics=[RobustAccuracy(0.1, steps=3, n_batches=1, amp=amp)])
    learn.add_cb(CPUAutocast(torch.bfloat16))
    probe, seen = DtypeProbe(learn.model), []
    class Clear(Callback):
        order = 49   # just before the Recorder accumulates the metrics
        def after_batch(self):
            if not self.training: probe.dtypes.clear()
    class Grab(Callback):
        order = 51
        def after_batch(self):
            if not self.training: seen.append(set(probe.dtypes))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4, cbs=[Clear(), Grab()])
    probe.remove()
    assert seen and seen[0], seen
    assert seen[0] == ({torch.float32} if amp is False else {torch.bfloat16}), seen
    r = learn.robust_validate(eps=0.1, steps=3, n_batches=1, show_progress=False, amp=amp)   # and after fit
    assert 0 <= r['robust_acc'] <= r['clean_acc']


def test_fp16_input_gradients_do_not_underflow():
    "Under fp16 autocast the attack rescales each example's loss gradient before the half-precision backward "
    "(`_input_grad`). On a confident model, whose fp32 input gradients are ~1e-8 (under fp16's smallest subnormal, "
    "6e-8), a plain fp16 backward gives an all-zero gradient for about half the examples, so PGD would not move them; "
    "the rescaled one gives none, with the signs of fp32's"
    import torch.nn.functional as F
    from rtl_fastai.attacks import _input_grad
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad(): m[-1].weight.mul_(1000.); m[-1].bias.zero_()   # confident: tiny cross-entropy gradients
    x = torch.rand(32, 3, 16, 16)
    with torch.no_grad(): y = m(x).argmax(1)
    def grad(dtype, rescaled):
        d = torch.zeros_like(x, requires_grad=True)
        with torch.autocast('cpu', dtype=dtype, enabled=dtype is not None):
            out = m(x + d); out32 = out.float(); losses = F.cross_entropy(out32, y, reduction='none')
            return _input_grad(out, out32, losses, d) if rescaled else torch.autograd.grad(losses.sum(), d)[0]
    def zero_rows(g): return int((g.flatten(1).abs().amax(1) == 0).sum())
    g32, naive, ours = grad(None, False), grad(torch.float16, False), grad(torch.float16, True)
    assert zero_rows(g32) == 0 and zero_rows(naive) > 0   # the case is real: fp16 underflows without the rescaling
    assert zero_rows(ours) == 0
    assert (ours.sign() == g32.sign()).float().mean() > 0.9


@pytest.mark.parametrize('dtype', [None, torch.bfloat16, torch.float16])
def test_attacks_keep_channels_last(dtype):
    "A channels-last batch (3 channels: a 1-channel batch is channels-last and contiguous at once) stays channels-last "
    "through the attacks, in fp32 and under autocast, so the model's convolutions get the layout they were tuned for"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    m = m.eval().to(memory_format=torch.channels_last)
    x = torch.rand(6, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    y = torch.randint(0, 4, (6,))
    stats = ([0.5]*3, [0.25]*3)
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for xa in (pgd_attack(m, x, y, 0.1, steps=3, stats=stats), pgd_attack(m, x, y, 0.5, steps=3, norm='l2', stats=stats),
                   pgd_attack(m, x, y, 0.1, steps=3, stats=stats, drop_fooled=False), fgsm_attack(m, x, y, 0.1, stats=stats)):
            assert xa.is_contiguous(memory_format=torch.channels_last) and xa.dtype == torch.float32
