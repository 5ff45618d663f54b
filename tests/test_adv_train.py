"Adversarial-training callbacks: BatchNorm modes during attacks, pixel-space eps, free-AT replays, and composition with fastai's callbacks."
import pytest, torch, warnings
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation
import fastai.callback.schedule, fastai.callback.progress
from rtl_fastai.data.all import task_dls
from rtl_fastai.models import SmallCNN
from rtl_fastai.core import NormalizeInput
from rtl_fastai.attacks import robust_eval_batch
from rtl_fastai.callback.adv_train import *

torch.set_num_threads(1)
EPS = 0.2  # digits eps (see nbs/04_callback.adv_train.ipynb)
METHODS = {'pgd': lambda: PGDTraining(EPS, steps=3), 'free': lambda: FreeAdvTraining(EPS, replays=3),
           'fast': lambda: FastAdvTraining(EPS), 'trades': lambda: TRADESTraining(EPS, steps=3)}

@pytest.fixture(scope='module')
def dls(): return task_dls('digits', classes='source', bs=64, seed=0)

def _learn(dls, seed=0, **kw):
    torch.manual_seed(seed)
    return Learner(dls, SmallCNN(n_in=1, n_out=dls.c, widths=(16, 32)), **kw)

def _fit(learn, n, cbs, lr=3e-3):
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit_one_cycle(n, lr, cbs=cbs)

def _fit_acting(learn, cb, cbs=()):
    ("Fit one epoch with the adversarial-training callback `cb` and check that it acted on the training batches: "
     "the inputs moved (PGD, free and fast AT) or the loss holds TRADES' KL term")
    before, after, gaps = BatchSpy(cb.order - 0.5), BatchSpy(cb.order + 0.5), []
    class Gap(Callback):
        order = cb.order + 0.5
        def after_loss(self):
            if self.training:
                gaps.append((self.learn.loss_grad.float() - F.cross_entropy(self.learn.pred.float(), self.yb[0])).item())
    _fit(learn, 1, [cb, *cbs, before, after, Gap()])
    assert torch.isfinite(torch.tensor(learn.recorder.losses)).all()
    if isinstance(cb, TRADESTraining): assert max(gaps) > 0
    else: assert any(not torch.equal(a, b) for a, b in zip(before.xbs, after.xbs))

def _robust(model, dls, eps=EPS):
    c, r = zip(*[robust_eval_batch(model, x, y, eps=eps, steps=10, stats=dls) for x, y in dls.valid])
    return torch.cat(c).float().mean().item(), torch.cat(r).float().mean().item()

class BatchSpy(Callback):
    "Records (at its `order`) the training batches and the number of optimizer steps"
    def __init__(self, order): self.order, self.xbs, self.steps, self.valid_xbs = order, [], 0, []
    def before_batch(self):
        (self.xbs if self.training else self.valid_xbs).append(self.learn.xb[0].detach().clone())
    def after_step(self): self.steps += 1

class BNModeSpy:
    "Records `training` of a BatchNorm layer at each forward call"
    def __init__(self, model):
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        self.modes = []
        self.h = bn.register_forward_pre_hook(lambda m, i: self.modes.append(m.training))

def test_small_evidence_all_methods(dls):
    "Each method gives a far more robust source model than natural training (small version of the notebook's table)"
    nat = _learn(dls); _fit(nat, 4, [])
    c0, r0 = _robust(nat.model, dls)
    assert c0 > 0.9
    for k, make in METHODS.items():
        learn = _learn(dls)
        _fit(learn, 4 // (3 if k == 'free' else 1) or 1, [make()])
        c, r = _robust(learn.model, dls)
        assert c > 0.8, (k, c)
        assert r > r0 + 0.3, (k, r, r0)

@pytest.mark.parametrize('method,attack_modes', [('pgd', [False]*3), ('fast', [False]), ('trades', [False]*4), ('free', [])])
def test_batchnorm_mode_during_attack(dls, method, attack_modes):
    "Documented BN modes: eval for the attack passes of PGD/fast/TRADES, train for every pass of free AT"
    learn = _learn(dls)
    spy = BNModeSpy(learn.model)
    _fit(learn, 1, [METHODS[method](), _StopAfter(1)])
    n_train_fwd = 2 if method == 'trades' else 1
    head_check = [] if method == 'free' else [False]   # first batch of a fit: one example, eval mode, checks the head
    per_step = head_check + attack_modes + [True]*n_train_fwd
    assert spy.modes[:len(per_step)] == per_step, spy.modes[:len(per_step)]
    assert spy.modes[len(per_step)] is False  # then validation (eval, not attacked... for PGD the next is validation)

class _StopAfter(Callback):
    "Cancel the fit after `n` training batches (validation included so the fit ends normally)"
    order = 99
    def __init__(self, n): self.n = n
    def before_fit(self): self.k = 0
    def after_batch(self):
        if self.training:
            self.k += 1
            if self.k >= self.n: raise fastai.callback.core.CancelTrainException()

import fastai.callback.core

@pytest.mark.parametrize('method', ['pgd', 'fast', 'trades'])
def test_eps_in_pixel_units_and_valid_untouched(dls, method):
    "The attacked batch stays within eps of the clean one in [0,1] pixels, under Normalize; validation batches are clean"
    learn = _learn(dls)
    before, after = BatchSpy(9.5), BatchSpy(12)
    cb = METHODS[method]()
    _fit(learn, 1, [before, after, cb])
    ps = NormalizeInput.from_stats(dls)
    if method == 'trades':  # the batch is the clean one; the adversarial one is a separate forward
        xa = None
    else:
        assert len(before.xbs) == len(after.xbs) == len(dls.train)
        for x, xa in zip(before.xbs, after.xbs):
            d = ps.to_pixels(xa) - ps.to_pixels(x)
            assert d.abs().max() <= EPS + 1e-5 and d.abs().max() > EPS/2
            p = ps.to_pixels(xa)
            assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5
    for x, v in zip(after.valid_xbs, dls.valid): assert torch.equal(x, v[0])

def test_trades_perturbation_within_eps(dls):
    learn = _learn(dls)
    seen = []
    class Grab(Callback):
        order = 12
        def before_batch(self):
            if self.training: seen.append((self.learn.xb[0].clone(), self.learn.trades_training.x_adv.clone()))
    _fit(learn, 1, [TRADESTraining(EPS, steps=3), Grab()])
    ps = NormalizeInput.from_stats(dls)
    for x, xa in seen:
        d = ps.to_pixels(xa) - ps.to_pixels(x)
        assert EPS/2 < d.abs().max() <= EPS + 1e-5

def test_free_at_replays_and_carries_the_perturbation(dls):
    m = 3
    learn = _learn(dls)
    spy = BatchSpy(12)
    _fit(learn, 1, [FreeAdvTraining(EPS, replays=m), spy])
    n = len(dls.train)
    assert spy.steps == m*n and len(spy.xbs) == m*n and len(learn.recorder.lrs) == m*n
    ps = NormalizeInput.from_stats(dls)
    for b in range(n):
        reps = [ps.to_pixels(spy.xbs[b*m + i]) for i in range(m)]
        # the same clean batch underneath each replay: replays differ by at most 2 eps
        for r in reps[1:]: assert (r - reps[0]).abs().max() <= 2*EPS + 1e-5
        # the perturbation changes from replay to replay (it is updated by each backward pass)
        assert not torch.allclose(reps[0], reps[1])
    # the first replay of the second batch starts from the perturbation carried over (not zero)
    cb, kept = FreeAdvTraining(EPS, replays=m), []
    class Keep(Callback):
        def after_train(self): kept.append(cb.delta)
    learn2 = _learn(dls)
    _fit(learn2, 1, [cb, Keep()])
    d = kept[0]
    assert d is not None and d.abs().max() > 0 and d.abs().max() <= EPS + 1e-6
    assert cb.delta is None   # dropped after the fit: `learn.export()` does not carry a batch-sized tensor

def test_free_at_epochs_match_natural_steps(dls):
    "fit_one_cycle(n//m) with free AT makes as many optimizer steps as fit_one_cycle(n) naturally, on one schedule"
    nat, free = _learn(dls), _learn(dls)
    _fit(nat, 4, [])
    _fit(free, 2, [FreeAdvTraining(EPS, replays=2)])
    assert len(nat.recorder.lrs) == len(free.recorder.lrs)
    torch.testing.assert_close(torch.tensor(nat.recorder.lrs), torch.tensor(free.recorder.lrs))

@pytest.mark.parametrize('method', list(METHODS))
@pytest.mark.parametrize('amp_mode', ['fp16', 'bf16'])
def test_mixed_precision(dls, method, amp_mode):
    "Composes with MixedPrecision (on CPU autocast('cuda') is a no-op, so this checks the event flow: the attack still acts)"
    _fit_acting(_learn(dls), METHODS[method](), [MixedPrecision(amp_mode=amp_mode)])

@pytest.mark.parametrize('method', list(METHODS))
def test_gradient_accumulation(dls, method):
    "With GradientAccumulation(n_acc=2*bs) there is one optimizer step per two batches"
    learn = _learn(dls)
    spy = BatchSpy(50)
    _fit(learn, 1, [METHODS[method](), GradientAccumulation(n_acc=128), spy])
    n = len(dls.train) * (3 if method == 'free' else 1)
    assert n//2 - 1 <= spy.steps <= n//2 + 1

def test_trades_loss_scaled_by_gradient_accumulation(dls):
    "The KL term is added before GradientAccumulation divides the loss: loss_grad = (CE + beta*KL)/(n_acc/bs)"
    learn = _learn(dls)
    got = []
    class Check(Callback):
        order = GradientAccumulation.order + 1
        def after_loss(self):
            if not self.training: return
            t = self.learn.trades_training
            ce = F.cross_entropy(self.learn.pred, self.learn.yb[0])
            bs = len(self.learn.yb[0])
            got.append((self.learn.loss_grad.item(), ((ce + 6.*t.kl)*bs/256).item()))
    _fit(learn, 1, [TRADESTraining(EPS, steps=2), GradientAccumulation(n_acc=256), Check()])
    for a, b in got: assert abs(a - b) < 1e-5*max(1, abs(b))

def test_trades_kl():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    ref = torch.nn.KLDivLoss(reduction='sum')(F.log_softmax(a, 1), F.softmax(b, 1)) / 4
    torch.testing.assert_close(trades_kl(a, b), ref)
    torch.testing.assert_close(trades_kl(b, b), torch.tensor(0.), atol=1e-6, rtol=0)

def test_vision_learner_models():
    "Works on a fastai vision_learner ResNet (frozen body, fastai head), not only our models"
    from fastai.vision.learner import vision_learner
    from fastai.vision.models import resnet18
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 4, (8,))
    ds = TensorDataset(x, y)
    vdls = DataLoaders.from_dsets(ds, ds, bs=8, device="cpu")
    for make in [lambda: PGDTraining(8/255, steps=2), lambda: FreeAdvTraining(8/255, replays=2),
                 lambda: FastAdvTraining(8/255), lambda: TRADESTraining(8/255, steps=2)]:
        learn = vision_learner(vdls, resnet18, pretrained=False, n_out=4, loss_func=CrossEntropyLossFlat())
        _fit_acting(learn, make())

def test_bad_inputs(dls):
    with pytest.raises(ValueError, match='pixel units'): PGDTraining(8)
    with pytest.raises(ValueError, match='`steps`'): PGDTraining(0.1, steps=0)
    with pytest.raises(ValueError, match='`alpha`'): FastAdvTraining(0.1, alpha=-1)
    with pytest.raises(ValueError, match='`replays`'): FreeAdvTraining(0.1, replays=1.5)
    with pytest.raises(ValueError, match='`beta`'): TRADESTraining(0.1, beta=-1)
    # a model with two inputs is refused by name
    x = torch.rand(8, 1, 8, 8)
    ds = TensorDataset(x, x, torch.randint(0, 2, (8,)))
    dls2 = DataLoaders.from_dsets(ds, ds, bs=4, device='cpu')
    dls2.n_inp = 2
    class Two(nn.Module):
        def __init__(self): super().__init__(); self.l = nn.Linear(64, 2)
        def forward(self, a, b): return self.l((a + b).flatten(1))
    learn = Learner(dls2, Two(), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match='one input'):
        _fit(learn, 1, [PGDTraining(0.1)])

def test_robust_accuracy_metric_composes(dls):
    "Training callbacks leave validation to RobustAccuracy: its column is the robust accuracy of the trained model"
    from rtl_fastai.callback.adv_valid import RobustAccuracy
    learn = _learn(dls, metrics=[RobustAccuracy(eps=EPS, steps=3)])
    _fit(learn, 1, [PGDTraining(EPS, steps=3)])
    assert len(learn.recorder.values) == 1 and learn.recorder.metric_names[-2] == 'pgd3_acc@0.2'
    res = learn.robust_validate(eps=EPS, steps=3, show_progress=False)
    assert learn.recorder.values[0][-1] == pytest.approx(res['robust_acc'], rel=1e-6) and res['robust_acc'] > 0  # same seed


def test_free_at_skips_a_nonfinite_gradient_step():
    "Free AT: a step whose input gradient overflowed leaves the perturbation as it was (chosen on the device)."
    cb = FreeAdvTraining(0.1, replays=2)
    g0 = torch.Generator().manual_seed(0)
    p = torch.rand(4, 1, 3, 3, generator=g0)
    g = torch.randn(4, 1, 3, 3, generator=g0)
    bad = g.clone(); bad[0, 0, 0, 0] = float('inf')
    def step(grad, delta):
        cb._p, cb.delta = p, delta
        d = ((p + cb._carry(p)).clamp(0, 1) - p).requires_grad_()
        cb._d = d; d.grad = grad
        cb.after_backward()
        assert cb._d.grad is None
        return cb.delta
    ref = (p + (0.1*g.sign()).clamp(-0.1, 0.1)).clamp(0, 1) - p
    assert torch.equal(step(g, None), ref)                        # a finite step from no carried perturbation
    assert torch.equal(step(bad, ref.clone()), ref)               # skipped: the carried perturbation stays
    assert torch.equal(step(bad, None), torch.zeros_like(p))      # skipped, nothing carried: the start (zeros)
    big = torch.rand(6, 1, 3, 3, generator=g0) * 0.1              # carried from a larger batch (other shape)
    assert torch.equal(step(bad, big), big)                       # skipped: kept whole, for the next batch
    d = (p + big[:4]).clamp(0, 1) - p
    upd = step(g, big)  # a finite step updates the rows of this batch and keeps the others for the next full batch
    assert torch.equal(upd[:4], (p + (d + 0.1*g.sign()).clamp(-0.1, 0.1)).clamp(0, 1) - p)
    assert torch.equal(upd[4:], big[4:])
    cb.threat = cb.threat.replace(alpha=0.03)                     # `alpha`: the FGSM step (default eps)
    assert torch.equal(step(g, None), (p + (0.03*g.sign()).clamp(-0.1, 0.1)).clamp(0, 1) - p)


def test_unused_threat_fields_are_refused():
    "Fields a method cannot use raise an error naming them, rather than being ignored"
    from rtl_fastai.attacks import ThreatModel
    for f, what in ((lambda: FreeAdvTraining(EPS, steps=5), 'replays'),
                    (lambda: FreeAdvTraining(ThreatModel(EPS, restarts=2)), '`restarts`'),
                    (lambda: FastAdvTraining(EPS, steps=7), 'PGDTraining'),
                    (lambda: FastAdvTraining(EPS, restarts=3), '`restarts`'),
                    (lambda: TRADESTraining(EPS, restarts=2), '`restarts`'),
                    (lambda: FastAdvTraining(EPS, restarts=2, random_start=False), 'runs one attack per batch')):
        with pytest.raises(ValueError, match=what): f()
    assert PGDTraining(EPS, restarts=2).threat.restarts == 2   # PGD keeps the run that fools, else the highest loss


def test_free_at_keeps_the_perturbation_of_rows_a_small_batch_lacks(dls):
    "A last batch smaller than the others (drop_last=False) updates only its rows of the carried perturbation"
    cb = FreeAdvTraining(EPS, replays=1)
    learn = _learn(dls)
    cb.learn = learn
    cb._sp, cb._stats, cb.delta = None, dls, None
    x, learn.train_iter = torch.rand(6, 1, 8, 8), 1
    for i, n in enumerate((6, 2, 6)):
        learn.xb, learn.yb = (x[:n],), (torch.zeros(n, dtype=torch.long),)
        cb.before_batch()
        if i == 2: assert (cb._d[2:].detach() != 0).all()  # rows 2-5 start from the first step's perturbation
        cb._d.grad = torch.randn_like(cb._d)
        cb.after_backward()
        assert len(cb.delta) == 6


def test_single_label_targets_or_a_clear_error():
    "Multi-label targets: refused by the callbacks whose attack maximizes cross-entropy (or TRADES' softmax KL), which "
    "would read them as soft labels; FreeAdvTraining follows the learner's own loss, so it trains."
    from fastai.data.load import DataLoader
    from fastai.losses import BCEWithLogitsLossFlat
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(16, 1, 8, 8, generator=g), (torch.rand(16, 5, generator=g) > 0.5).float())
    mdls = DataLoaders(DataLoader(ds, bs=8), DataLoader(ds, bs=8))
    mdls.c = 5
    for name in ('pgd', 'fast', 'trades'):
        learn = _learn(mdls, loss_func=BCEWithLogitsLossFlat())
        with pytest.raises(ValueError, match=r"needs class indices.*got torch.float32 \(8, 5\) \(multi-label"):
            with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
                warnings.simplefilter('ignore'); learn.fit(1, cbs=METHODS[name]())
    learn = _learn(mdls, loss_func=BCEWithLogitsLossFlat())
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); learn.fit(1, cbs=METHODS['free']())
    assert learn.recorder.losses and all(torch.isfinite(torch.as_tensor(l)) for l in learn.recorder.losses)

def test_free_at_inputs_within_eps_and_pixel_range(dls):
    "Every input free AT trains on is within eps (L-inf, pixels) of its clean batch and in [0,1], replays and carry included"
    learn = _learn(dls)
    before, after = BatchSpy(FreeAdvTraining.order - 0.5), BatchSpy(FreeAdvTraining.order + 0.5)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); learn.fit(1, 3e-3, cbs=[FreeAdvTraining(EPS, replays=3), before, after])
    ps = NormalizeInput.from_stats(dls)
    assert len(before.xbs) == len(after.xbs) == 3*len(dls.train)
    moved = 0.
    for x, xa in zip(before.xbs, after.xbs):
        p, pa = ps.to_pixels(x), ps.to_pixels(xa)
        assert (pa - p).abs().max() <= EPS + 1e-5
        assert pa.min() >= -1e-5 and pa.max() <= 1 + 1e-5, (pa.min().item(), pa.max().item())
        moved = max(moved, (pa - p).abs().max().item())
    assert moved > EPS/2   # the perturbation is not zero

def test_fgsm_step_sizes():
    ("FGSM: one step of eps from x (every pixel moves by exactly eps along the gradient's sign); FGSM-RS (Wong et al.): "
     "a step of 1.25*eps from a uniform random start, projected: each pixel ends in [0.25*eps, eps] along the sign")
    from rtl_fastai.attacks import fgsm_attack
    torch.manual_seed(0)
    lin = nn.Linear(64, 2); m = nn.Sequential(nn.Flatten(), lin).eval()
    x, y, eps = torch.full((16, 1, 8, 8), 0.5), torch.zeros(16, dtype=torch.long), 0.1
    s = (lin.weight[1] - lin.weight[0]).sign().view(1, 1, 8, 8)   # the sign of d CE / dx for y=0, anywhere
    v = (fgsm_attack(m, x, y, eps=eps) - x) * s
    torch.testing.assert_close(v, torch.full_like(v, eps))
    v = (fgsm_attack(m, x, y, eps=eps, random_start=True) - x) * s
    assert v.min() >= 0.25*eps - 1e-6 and v.max() <= eps + 1e-6, (v.min().item(), v.max().item())
    assert 0.55 < (v > eps - 1e-6).float().mean() < 0.7   # P(u >= -eps/4) = 0.625 of the 1024 pixels reach eps


@pytest.mark.parametrize('method', ['pgd', 'trades'])
def test_lr_find_puts_the_weights_back_when_they_diverge(dls, method, tmp_path):
    ("`lr_find`'s high learning rates can make the weights nan: the attack's error on the next batch ends the search "
     "(as `lr_find`'s own divergence check would) and `lr_find` puts the weights back; in a plain fit it is an error")
    class Poison(Callback):  # the divergence, made certain: nan weights after the 41st step
        order = 100
        def after_step(self):
            if self.train_iter == 40:
                with torch.no_grad(): next(self.learn.model.parameters()).fill_(float('nan'))
    learn = _learn(dls, cbs=[METHODS[method](), Poison()], path=tmp_path)
    w0 = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); learn.lr_find(show_plot=False)
    assert len(learn.recorder.losses) == 41   # the batches before the nan weights
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, w0[k]), k
    learn = _learn(dls, cbs=[METHODS[method](), Poison()], path=tmp_path)
    with pytest.raises(ValueError, match='non-finite'): _fit(learn, 5, [])
    # weights nan before the search (an earlier fit diverged): not the search's doing, the error says so
    learn = _learn(dls, cbs=[METHODS[method]()], path=tmp_path)
    with torch.no_grad(): next(learn.model.parameters()).fill_(float('nan'))
    with learn.no_bar(), pytest.raises(ValueError, match=r'non-finite.*outputs are nan/inf'): learn.lr_find(show_plot=False)
