"PGD robust accuracy (rtl_fastai.attacks + rtl_fastai.callback.adv_valid) on a trained digits model."
import copy, pytest, torch
from torch import nn
from fastai.learner import Learner
import fastai.callback.all  # noqa: F401  (Learner.no_bar, MixedPrecision, ...)
from fastai.metrics import accuracy
from rtl_fastai.data.all import task_dls, normalize_stats
from rtl_fastai.models import NormalizeInput
from rtl_fastai.attacks import pgd_attack, fgsm_attack, robust_eval_batch
from rtl_fastai.callback.adv_valid import RobustAccuracy, robust_accuracy_curve

EPS, STEPS = 0.1, 20   # on 8x8 digits eps=0.1 leaves a mid-range robust accuracy (about 65%)

def _valid(dls):
    xs, ys = zip(*[(x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)) for x, y in dls.valid])
    return torch.cat(xs), torch.cat(ys)

def _learn(dls, model, **kw): return Learner(dls, copy.deepcopy(model), metrics=accuracy, **kw)

def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()], [p.requires_grad for p in model.parameters()])

def _same_state(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1] == b[1] and a[3] == b[3]
    assert all((g is None and h is None) or (g is not None and h is not None and torch.equal(g, h)) for g, h in zip(a[2], b[2]))

def test_no_weaker_than_torchattacks(digits_dls, digits_model):
    "Our PGD is at most 1.5 points weaker (higher robust accuracy) than torchattacks' PGD, on all 450 images."
    torchattacks = pytest.importorskip('torchattacks')
    mean, std = normalize_stats(digits_dls)
    x, y = _valid(digits_dls)
    alpha = 2.5*EPS/STEPS
    # torchattacks takes [0,1] pixels: give it the model with the normalization inside
    pix_model = nn.Sequential(NormalizeInput(mean, std), copy.deepcopy(digits_model)).eval()
    p = x*std + mean
    learn = _learn(digits_dls, digits_model)
    theirs, ours = [], []
    for seed in range(5):   # one run has a random-start noise of about 0.5 point (sd): average 5 runs of each
        torch.manual_seed(seed)
        xa = torchattacks.PGD(pix_model, eps=EPS, alpha=alpha, steps=STEPS, random_start=True)(p, y)  # needs grad enabled
        with torch.no_grad(): theirs.append((pix_model(xa).argmax(1) == y).float().mean().item())
        ours.append(learn.robust_validate(eps=EPS, steps=STEPS, alpha=alpha, seed=seed, show_progress=False)['robust_acc'])
    theirs, ours = sum(theirs)/5, sum(ours)/5
    print(f"robust acc (mean of 5 random starts): torchattacks {theirs:.4f}  ours {ours:.4f}")
    assert 0.2 < theirs < 0.9, "the comparison is only informative at a mid-range robust accuracy"
    # Same algorithm (uniform random start, signed step, projection and [0,1] clamp in pixels), so the
    # plain attacks differ only by their random starts; dropping fooled examples (on in robust_validate)
    # only lowers robust accuracy, as an example keeps its plain-PGD trajectory until it is fooled.
    # The means of 5 runs differ by noise of about 0.4 point (sd): 1.5 points is well above it.
    assert ours <= theirs + 0.015

def test_eps_zero_is_clean(digits_dls, digits_model):
    res = _learn(digits_dls, digits_model).robust_validate(eps=0., steps=5, show_progress=False)
    assert res['robust_acc'] == res['clean_acc'] and res['n'] == 450

def test_monotone_in_eps_and_steps(digits_dls, digits_model):
    learn = _learn(digits_dls, digits_model)
    df = robust_accuracy_curve(learn, [0., 0.05, 0.1, 0.2], steps=10)
    assert df.robust_acc[0] == df.clean_acc[0]
    assert (df.robust_acc.diff()[1:] <= 0).all(), df
    # fixed step size and seed: PGD-k with dropping is a prefix of PGD-m (m > k), so it is exactly monotone
    accs = [learn.robust_validate(eps=EPS, steps=s, alpha=EPS/8, show_progress=False)['robust_acc'] for s in (1, 5, 20)]
    assert accs[0] >= accs[1] >= accs[2], accs
    assert accs[2] < accs[0]

def test_restarts_and_dropping_only_lower(digits_dls, digits_model):
    x, y = _valid(digits_dls)
    def ra(**kw):
        torch.manual_seed(0)
        return robust_eval_batch(digits_model, x, y, eps=EPS, steps=5, stats=digits_dls, **kw)[1].float().mean().item()
    plain, drop, r3, r3d = ra(drop_fooled=False), ra(), ra(drop_fooled=False, restarts=3), ra(restarts=3)
    assert drop <= plain and r3 <= plain and r3d <= drop, (plain, drop, r3, r3d)

def test_normalize_in_dls_or_in_model(digits_dls, digits_model):
    "The same pixel eps gives the same robust accuracy wherever the normalization is done."
    mean, std = normalize_stats(digits_dls)
    raw_dls = task_dls('digits', bs=64, seed=0, normalize=False)
    inside = nn.Sequential(NormalizeInput(mean, std), copy.deepcopy(digits_model)).eval()
    a = _learn(digits_dls, digits_model).robust_validate(eps=EPS, steps=10, show_progress=False)
    b = Learner(raw_dls, inside, metrics=accuracy).robust_validate(eps=EPS, steps=10, show_progress=False)
    assert a['clean_acc'] == b['clean_acc']
    # identical random starts (same seed, drawn in pixel space); only float rounding of the mapping differs
    assert abs(a['robust_acc'] - b['robust_acc']) <= 2/450, (a, b)

def test_metric_leaves_learner_and_model_alone(digits_dls, digits_model):
    learn = _learn(digits_dls, digits_model)
    m = learn.model
    params = list(m.parameters())
    params[0].requires_grad_(False)
    for p in params[1:3]: p.grad = torch.randn_like(p)
    ref = learn.validate()
    m.train(); m[0].eval()   # a mixed state, as in transfer learning
    before = _state(m)
    ra = RobustAccuracy(eps=EPS, steps=5)
    learn.metrics = [ra, accuracy]
    with learn.no_bar(): out = learn.validate()
    assert out[0] == ref[0] and out[2] == ref[1]   # loss and clean accuracy unchanged
    assert 'pgd5_acc@0.1' in learn.recorder.metric_names and out[1] < out[2]
    before_modes = before[1]
    m.train(); m[0].eval()   # fastai's validate put the model in eval mode itself: compare the rest
    _same_state(before, _state(m))
    learn.robust_validate(eps=EPS, steps=3, show_progress=False)   # robust_validate restores modes too
    _same_state(before, _state(m))
    assert before_modes == [x.training for x in m.modules()]

def test_train_metrics_leave_training_batches_alone(digits_dls, digits_model):
    "With `Recorder(train_metrics=True)` the metric attacks no training batch (it may be adversarial already): "
    "a warning, an empty training column, and the validation column as without it"
    from rtl_fastai.callback.adv_train import PGDTraining
    learn = Learner(digits_dls, copy.deepcopy(digits_model), metrics=RobustAccuracy(eps=EPS, steps=3),
                    cbs=PGDTraining(EPS, steps=2))
    learn.recorder.train_metrics = True
    with learn.no_bar(), learn.no_logging(), pytest.warns(UserWarning, match='validation batches only'):
        learn.fit(1, 0)  # lr 0 (BatchNorm statistics still move: both values below read the final model)
    ra = learn.metrics[0]
    assert ra.value == learn.robust_validate(eps=EPS, steps=3, show_progress=False)['robust_acc']
    names, vals = learn.recorder.metric_names[1:-1], learn.recorder.values[-1]
    assert vals[names.index('train_pgd3_acc@0.1')] is None

def test_metric_rng_and_n_batches(digits_dls, digits_model):
    learn = _learn(digits_dls, digits_model)
    ra = RobustAccuracy(eps=EPS, steps=5, n_batches=1)
    learn.metrics = [accuracy, ra]
    learn.metrics = [accuracy]
    torch.manual_seed(3)
    with learn.no_bar(): learn.validate()
    s_ref = torch.get_rng_state()
    learn.metrics = [accuracy, ra]
    torch.manual_seed(3)
    with learn.no_bar(): v1 = learn.validate()[2]
    assert torch.equal(torch.get_rng_state(), s_ref), "the metric must not change the random numbers of the Learner"
    assert int(ra.total) == 128
    with learn.no_bar(): v2 = learn.validate()[2]
    assert v1 == v2

@pytest.mark.parametrize('meth', ['to_fp16', 'to_bf16'])
def test_mixed_precision_learner(digits_dls, digits_model, meth, device):
    """fastai's MixedPrecision: the metric works and matches fp32 (on CPU its autocast('cuda') is disabled and the
    metric runs in fp32 too; on CUDA the metric attacks in fp16/bf16: two binomial standard errors plus one example)."""
    import warnings
    learn = _learn(digits_dls, digits_model)
    learn.metrics = [accuracy, RobustAccuracy(eps=EPS, steps=5, n_batches=1)]
    with learn.no_bar(): ref = learn.validate()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        getattr(learn, meth)()
        with learn.no_bar(): out = learn.validate()
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-5)
    tol = 1/128 if device.type != 'cuda' else 2*(max(ref[2]*(1-ref[2]), 1/128)/128)**0.5 + 1/128
    assert out[2] == pytest.approx(ref[2], abs=tol)

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_cpu_autocast_under_no_grad(digits_dls, digits_model, dtype):
    x, y = _valid(digits_dls)
    x, y = x[:128], y[:128]
    before = _state(digits_model)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype):
        torch.manual_seed(0); xa = pgd_attack(digits_model, x, y, eps=EPS, steps=10, stats=digits_dls)
    _same_state(before, _state(digits_model))
    assert xa.dtype == x.dtype
    mean, std = normalize_stats(digits_dls)
    assert ((xa - x)*std).abs().max() <= EPS + 1e-5
    with torch.no_grad():
        assert (digits_model(xa).argmax(1) == y).float().mean() < (digits_model(x).argmax(1) == y).float().mean() - 0.1

def test_bad_input(digits_dls, digits_model):
    x, y = _valid(digits_dls)
    x, y = x[:8], y[:8]
    for kw, name in [(dict(eps=-0.1), '`eps`'), (dict(eps=0.1, steps=0), '`steps`'), (dict(eps=0.1, norm='l1'), '`norm`'),
                     (dict(eps=0.1, alpha=0.), '`alpha`'), (dict(eps=0.1, alpha=-1.), '`alpha`'), (dict(eps=0.1, restarts=0), '`restarts`')]:
        with pytest.raises(ValueError, match=name): pgd_attack(digits_model, x, y, **kw)
        with pytest.raises(ValueError, match=name): RobustAccuracy(**kw)
    with pytest.raises(ValueError, match='`eps`'): fgsm_attack(digits_model, x, y, eps=-1.)
    with pytest.raises(ValueError, match='`n_batches`'): RobustAccuracy(n_batches=0)
    bad = nn.Sequential(digits_model, nn.Flatten(0))   # returns one flat vector for the batch
    with pytest.raises(ValueError, match='`model`'): pgd_attack(bad, x, y, eps=0.1, steps=2)
    with pytest.raises(ValueError, match='`model`'): Learner(digits_dls, bad).robust_validate(eps=0.1, steps=2, show_progress=False)
    with pytest.raises(ValueError, match='`eps_list`'): robust_accuracy_curve(Learner(digits_dls, digits_model), [])


# -- one host-device sync per PGD step (issue 15 review): the same results as the boolean-mask implementation ---------
def _ref_check_losses(losses, out32, d):
    if losses.ndim == 0 or losses.shape[0] != d.shape[0]:
        raise ValueError("`loss_func` must return one loss per example (e.g. `nn.CrossEntropyLoss(reduction='none')`)")
    if not torch.isfinite(losses).all():
        why = ("the model's outputs are nan/inf (diverged weights or bad inputs?)" if not torch.isfinite(out32).all()
               else "the loss itself is not finite")
        raise ValueError(f"`loss_func` returned {int((~torch.isfinite(losses)).sum())} non-finite (nan/inf) losses "
                         f"for {len(losses)} examples: {why}; no attack can follow that gradient")

def _ref_pgd_core(model, p, y, space, eps, steps, alpha, norm, random_start, loss_func, drop_fooled,
                  final_eval=True, in_dtype=torch.float32):
    "The implementation before the review (boolean masks, a sync per indexing), kept as the reference."
    from rtl_fastai.attacks import _random_start, _check_out, _input_grad, _step
    n = p.shape[0]
    delta = _random_start(p, eps, norm) if random_start else torch.zeros_like(p)
    fooled = torch.zeros(n, dtype=torch.bool, device=p.device)
    loss_at = torch.full((n,), -float('inf'), device=p.device)
    idx, pa, ya, da = None, p, y, delta
    for i in range(steps+1):
        last = i == steps
        if last and not final_eval: break
        d = da.detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            out = _check_out(model(space(pa+d).to(in_dtype)), d)
            out32 = out.float()
            losses = loss_func(out32, ya)
        _ref_check_losses(losses, out32, d)
        wrong = out.detach().argmax(1) != ya if (drop_fooled or last) else None
        g = None if last else _input_grad(out, out32, losses, d)
        ls, d = losses.detach(), d.detach()
        if drop_fooled and wrong.any():
            gi = torch.arange(n, device=p.device) if idx is None else idx
            w = gi[wrong]
            fooled[w], loss_at[w], delta[w] = True, ls[wrong], d[wrong]
            keep = ~wrong
            idx, pa, ya, d, ls = gi[keep], pa[keep], ya[keep], d[keep], ls[keep]
            if g is not None: g = g[keep]
            if len(idx) == 0: return delta, loss_at, fooled
        if last:
            if idx is None: loss_at, delta = ls, d
            else: loss_at[idx], delta[idx] = ls, d
            if not drop_fooled: fooled = wrong
            break
        da = _step(d, g, pa, eps, alpha, norm)
    if not final_eval:
        if idx is None: delta = da
        else: delta[idx] = da
    return delta, loss_at, fooled


@pytest.mark.parametrize('gpu_syncs', [False, True])
@pytest.mark.parametrize('norm,eps', [('linf', EPS), ('linf', 0.3), ('l2', 0.5)])
def test_pgd_core_same_as_boolean_masks(digits_dls, digits_model, norm, eps, gpu_syncs, monkeypatch):
    """Dropping fooled examples with a stable sort and integer indices: bit-identical to the boolean-mask version;
    also with a GPU's schedule of syncs (`_sync_steps` of 'cuda', forced on the CPU), where the examples fooled
    between two syncs wait frozen by `torch.where`."""
    import rtl_fastai.attacks as A
    from rtl_fastai.attacks import _pgd_core, _pixel_space
    if gpu_syncs:
        orig = A._sync_steps
        monkeypatch.setattr(A, '_sync_steps', lambda steps, device: orig(steps, 'cuda'))
    x, y = _valid(digits_dls)
    space = _pixel_space(digits_dls, x)
    loss = nn.CrossEntropyLoss(reduction='none')
    model = copy.deepcopy(digits_model).eval()
    n_dropped = 0
    for b, (lo, hi) in enumerate([(0, 128), (128, 300), (300, 450), (5, 6)]):
        p, yb = space.to_pixels(x[lo:hi]), y[lo:hi]
        for drop in (True, False):
            for final_eval in (True, False):
                outs = []
                for f in (_pgd_core, _ref_pgd_core):
                    torch.manual_seed(b)
                    outs.append(f(model, p, yb, space, eps, 7, 2.5*eps/7, norm, True, loss, drop, final_eval=final_eval))
                (d1, l1, f1), (d0, l0, f0) = outs
                assert torch.equal(d1, d0) and torch.equal(f1, f0), (b, drop, final_eval)
                if gpu_syncs and drop:   # a frozen example's loss is computed again in another batch: fp32 rounding
                    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
                else: assert torch.equal(l1, l0) or (torch.isinf(l0).all() and torch.isinf(l1).all()), (b, drop, final_eval)
                if drop and final_eval: n_dropped += int(f1.sum())
    assert n_dropped > 0   # examples were dropped along the way: the indexing path was exercised


class _TurnsNan(nn.Module):
    "Wraps a model; its outputs become nan from the `k`-th call on (0-based) for the rows selected by `rows`."
    def __init__(self, m, k, rows=slice(None)):
        super().__init__(); self.m, self.k, self.n, self.rows = m, k, 0, rows
    def forward(self, x):
        out = self.m(x)
        if self.n >= self.k: out = out.clone(); out[self.rows] = float('nan')
        self.n += 1
        return out


@pytest.mark.parametrize('drop', [True, False])
def test_nonfinite_loss_at_a_later_step(digits_dls, digits_model, drop):
    "A loss that turns non-finite after the first step (checked on the device, raised after the loop): same error."
    x, y = _valid(digits_dls)
    x, y = x[:64], y[:64]
    m = _TurnsNan(copy.deepcopy(digits_model), k=3, rows=slice(0, 5))
    with pytest.raises(ValueError, match=r"`loss_func` returned 5 non-finite \(nan/inf\) losses for \d+ examples: "
                                         r"the model's outputs are nan/inf"):
        pgd_attack(m, x, y, eps=0.05, steps=6, stats=digits_dls, drop_fooled=drop)
    m = _TurnsNan(copy.deepcopy(digits_model), k=0)
    with pytest.raises(ValueError, match=r"returned 64 non-finite .* for 64 examples"):  # from the first step on
        pgd_attack(m, x, y, eps=0.05, steps=6, stats=digits_dls)
    with pytest.raises(ValueError, match=r"non-finite .*the loss itself is not finite"):
        pgd_attack(copy.deepcopy(digits_model), x, y, eps=0.05, steps=4, stats=digits_dls,
                   loss_func=lambda o, t: nn.functional.cross_entropy(o, t, reduction='none') / (o[:, :1].sum()*0 + 0))


def test_stats_read_once_per_validation(digits_dls, digits_model, monkeypatch):
    "The metric builds its pixel space (checking the stats: a host-device sync for GPU stats) on the first batch of "
    "each validation only, and `robust_validate` reads the loader's stats once."
    import rtl_fastai.callback.adv_valid as av
    calls = {'space': 0, 'stats': 0}
    def counted(f, k):
        def g(*a, **kw): calls[k] += 1; return f(*a, **kw)
        return g
    monkeypatch.setattr(av, '_pixel_space', counted(av._pixel_space, 'space'))
    monkeypatch.setattr(av, 'normalize_stats', counted(av.normalize_stats, 'stats'))
    learn = Learner(digits_dls, copy.deepcopy(digits_model), metrics=RobustAccuracy(0.1, steps=2, n_batches=3))
    with learn.no_bar(): learn.validate()
    assert calls == {'space': 1, 'stats': 1}
    with learn.no_bar(): learn.validate()
    assert calls == {'space': 2, 'stats': 2}
    learn.robust_validate(eps=0.1, steps=2, n_batches=3, show_progress=False)
    assert calls == {'space': 3, 'stats': 3}


def test_n_batches_of_a_class_sorted_validation_set_warns(digits_model):
    "The first batches of a validation set in class order (image folders) hold few classes: a warning says so."
    import warnings
    from rtl_fastai.data.arrays import load_digits_data, ArrayData
    d = load_digits_data()
    o = d.y_valid.argsort(stable=True)
    dls = task_dls(ArrayData(d.x_train, d.y_train, d.x_valid[o], d.y_valid[o], d.classes, d.name), bs=32, val_bs=32)
    learn = Learner(dls, copy.deepcopy(digits_model), metrics=RobustAccuracy(0.1, steps=2, n_batches=2))
    with pytest.warns(UserWarning, match=r'RobustAccuracy\(n_batches=2\) attacked examples of only 2 of the 10 classes'):
        with learn.no_bar(): learn.validate()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with learn.no_bar(): learn.validate()   # once per metric
        torch.manual_seed(0); import random; random.seed(0)   # the shuffled loader's order (128 of 450 images)
        learn.robust_validate(dls.valid.new(shuffle=True), eps=0.1, steps=2, n_batches=4, show_progress=False)
        learn.robust_validate(eps=0.1, steps=2, show_progress=False)   # all batches


def test_robust_validate_puts_the_model_on_the_datas_device(digits_dls, digits_model):
    "As fastai's `validate` (`TrainEvalCallback.before_fit`): the model goes to the device of the DataLoader first"
    learn, moved = _learn(digits_dls, digits_model), []
    to = learn.model.to
    learn.model.to = lambda *a, **k: (moved.append(a), to(*a, **k))[1]
    learn.robust_validate(eps=EPS, steps=2, n_batches=1, show_progress=False)
    assert moved and moved[0][0] == digits_dls.valid.device


def test_custom_loss_in_autocast_dtype_with_drop_fooled(digits_dls, digits_model):
    "A per-example loss whose own layers run in the autocast dtype (bf16 here): the examples that leave keep their loss"
    x, y = _valid(digits_dls)
    torch.manual_seed(0); W = torch.randn(10, 10)
    def loss(o, t): z = torch.nn.functional.linear(o, W); return z.logsumexp(1) - z.gather(1, t[:, None]).squeeze(1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert loss(torch.randn(2, 10), torch.tensor([0, 1])).dtype == torch.bfloat16
        clean, robust = robust_eval_batch(digits_model, x[:64], y[:64], eps=EPS, steps=5, stats=digits_dls,
                                          loss_func=loss, drop_fooled=True)
    assert robust.sum() <= clean.sum()


def test_head_smaller_than_the_labels_is_an_error(digits_dls):
    "A model with 5 outputs on 10-class data: robust accuracy refuses (it counted every label >= 5 as wrong)"
    from rtl_fastai.models import SmallCNN
    learn = Learner(digits_dls, SmallCNN(1, 5, widths=(8, 16)))
    with pytest.raises(ValueError, match=r"the labels go up to 9 but the model has 5 outputs"):
        learn.robust_validate(eps=EPS, steps=2, n_batches=1, show_progress=False)

def test_plain_pytorch_dataloaders(digits_dls, digits_model):
    "A Learner on PyTorch DataLoaders of pixels (no fastai `Normalize`): the model normalizes; every entry point runs."
    import warnings
    from torch.utils.data import DataLoader as TorchDL, TensorDataset
    from fastai.data.core import DataLoaders
    from rtl_fastai.vis import adversarial_examples
    import rtl_fastai.report  # noqa: F401  (Learner.robustness_report)
    mean, std = normalize_stats(digits_dls)
    x, y = _valid(digits_dls)
    p = (x*std + mean).clamp(0, 1)   # pixels
    tdls = DataLoaders(TorchDL(TensorDataset(p, y), 64, shuffle=True), TorchDL(TensorDataset(p, y), 128))
    model = nn.Sequential(NormalizeInput(mean, std), copy.deepcopy(digits_model))
    learn = Learner(tdls, model, loss_func=nn.CrossEntropyLoss(), metrics=RobustAccuracy(EPS, steps=3))
    fastai_res = _learn(digits_dls, digits_model).robust_validate(eps=EPS, steps=3, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # pixels in [0,1], normalized once: no warning either
        res = learn.robust_validate(eps=EPS, steps=3, show_progress=False)
        rep = learn.robustness_report(EPS, steps=3, square_queries=None, n_batches=None, show=False)
        ex = adversarial_examples(learn, 3, EPS, seed=0)
    assert res['n'] == fastai_res['n'] == len(y)
    assert abs(res['robust_acc'] - fastai_res['robust_acc']) <= 0.03 and res['clean_acc'] == fastai_res['clean_acc']
    assert rep['results'].n.eq(len(y)).all() and len(ex['y']) == 3
    with pytest.raises(TypeError, match='fastai DataLoader'):
        from rtl_fastai.callback.adv_valid import in_random_order
        in_random_order(tdls.valid)

def test_dataparallel_model_attacked_through_its_wrapper(digits_dls, digits_model):
    "Evaluation and adversarial training attack the same model: out of DDP only; `DataParallel` (which splits the "
    "batch over the GPUs) is kept, and measures what the module inside it measures."
    from rtl_fastai.attacks import _attack_model
    from rtl_fastai.callback.adv_train import _attacked
    dp = nn.DataParallel(copy.deepcopy(digits_model))
    assert _attack_model(dp) is dp
    kw = dict(eps=EPS, steps=5, seed=0, show_progress=False)
    test = _learn(digits_dls, digits_model).robust_validate(**kw)
    learn = Learner(digits_dls, dp, metrics=accuracy)
    assert _attacked(learn) is dp
    assert learn.robust_validate(**kw) == test

def test_metrics_with_one_column_name_warn(digits_dls, digits_model):
    "Two RobustAccuracy metrics that differ in what the name does not show (the step size) warn once; `name=` fixes it."
    import warnings
    a, b = RobustAccuracy(EPS, steps=3, n_batches=1), RobustAccuracy(EPS, steps=3, alpha=0.01, n_batches=1)
    assert a.name == b.name
    learn = Learner(digits_dls, copy.deepcopy(digits_model), metrics=[accuracy, a, b])
    with warnings.catch_warnings(record=True) as w, learn.no_bar():
        warnings.simplefilter('always')
        learn.validate(); learn.validate()
    msgs = [str(x.message) for x in w if 'column name' in str(x.message)]
    assert len(msgs) == 2 and 'alpha=None and 0.01' in msgs[0] and 'give one of them `name=`' in msgs[0], msgs
    c = RobustAccuracy(EPS, steps=3, alpha=0.01, n_batches=1, name='pgd3_small_step')
    learn = Learner(digits_dls, copy.deepcopy(digits_model), metrics=[accuracy, a, c])
    with warnings.catch_warnings(record=True) as w, learn.no_bar():
        warnings.simplefilter('always')
        learn.validate()
    assert not [x for x in w if 'column name' in str(x.message)]
    assert list(learn.recorder.metric_names[-3:-1]) == [a.name, 'pgd3_small_step']

def test_no_bar_is_honoured(digits_dls, digits_model, capsys):
    "As fastai's `validate`: inside `learn.no_bar()` no progress bar is drawn (and none is asked for: show_progress=None)"
    learn = _learn(digits_dls, digits_model)
    kw = dict(eps=EPS, steps=2, n_batches=2)
    capsys.readouterr()
    with learn.no_bar():
        learn.robust_validate(**kw); robust_accuracy_curve(learn, [0., EPS], steps=2, n_batches=1)
    assert capsys.readouterr().out == ''
    learn.robust_validate(**kw)
    assert '2/2' in capsys.readouterr().out   # the bar, where the learner has one


def test_pgd_l2_stays_in_the_l2_ball(digits_dls, digits_model):
    "PGD-L2: each example's perturbation has L2 norm <= eps in [0,1] pixel units (and the attack is not a no-op)"
    x, y = digits_dls.valid.one_batch()
    ps = NormalizeInput.from_stats(digits_dls)
    for kw in (dict(), dict(restarts=3), dict(alpha=0.5)):
        torch.manual_seed(0)
        xa = pgd_attack(digits_model, x, y, eps=0.5, steps=10, norm='l2', stats=digits_dls, **kw)
        n = (ps.to_pixels(xa) - ps.to_pixels(x)).flatten(1).norm(dim=1)
        assert (n <= 0.5 + 1e-4).all(), (kw, n.max().item())
        assert n.max() > 0.4, kw   # it moved to (near) the sphere


def test_fastai_callbacks_monitor_the_robust_column(digits_dls, digits_model, tmp_path):
    "fastai's `SaveModelCallback` and `EarlyStoppingCallback` monitor the robust column by the metric's `name`"
    from fastai.callback.tracker import SaveModelCallback, EarlyStoppingCallback
    ra = RobustAccuracy(EPS, steps=2, n_batches=1)
    learn = _learn(digits_dls, digits_model, path=tmp_path)
    learn.metrics = [ra]
    save = SaveModelCallback(monitor=ra.name, fname='most_robust')
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-4, cbs=[save, EarlyStoppingCallback(monitor=ra.name, patience=5)])
    assert (tmp_path/'models'/'most_robust.pth').exists()
    col = learn.recorder.metric_names[1:-1].index(ra.name)
    assert save.best == max(v[col] for v in learn.recorder.values)
