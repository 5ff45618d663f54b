"""Strong evaluation (issue 8, part 5): `autoattack_evaluate`, the gradient-masking checks and
`Learner.robustness_report` (rtl_fastai.report)."""
import sys, warnings
import pandas as pd
import pytest
import torch
import torch.nn as nn
from fastai.learner import Learner
from rtl_fastai.models import SmallCNN
from rtl_fastai.core import NormalizeInput
from rtl_fastai.callback.adv_valid import in_random_order
from rtl_fastai.data.all import task_dls
from rtl_fastai.report import (autoattack_evaluate, square_evaluate, masking_checks, GradientMaskingWarning, PixelModel)

torch.set_num_threads(1)


def _learn(dls, digits_model):
    m = SmallCNN(); m.load_state_dict(digits_model.state_dict())
    return Learner(dls, m.eval())


class Quantized(nn.Module):
    "`model` on the image rounded to 4 levels: the zero gradient of rounding masks the gradient (obfuscated gradient)."
    def __init__(self, model, stats): super().__init__(); self.model, self.norm = model, NormalizeInput.from_stats(stats)
    def forward(self, x): return self.model(self.norm(torch.round(self.norm.to_pixels(x)*4)/4))


def _report(learn, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always', GradientMaskingWarning)
        rep = learn.robustness_report(**{**dict(eps=0.1, steps=10, n_batches=1, square_queries=300, show=False), **kw})
    return rep, [o for o in w if issubclass(o.category, GradientMaskingWarning)]


def test_report_honest_model(digits_dls, digits_model):
    learn = _learn(digits_dls, digits_model)
    modes = [m.training for m in learn.model.modules()]
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    rng = torch.get_rng_state()
    rep, w = _report(learn)
    res, checks = rep['results'], rep['checks']
    assert set(checks.check) == {'robust accuracy non-increasing in eps', 'robust accuracy non-increasing in steps',
                                 'restarts never above a single run', 'single-step FGSM not clearly stronger than PGD',
                                 'black-box Square not clearly stronger than PGD', 'unbounded attack fools every example'}
    assert checks.passed.all(), checks
    assert not w, [str(o.message) for o in w]
    assert (res.n == 128).all() and (res.robust_acc <= res.clean_acc).all()
    # the global RNG and the model's modes are left alone
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in learn.model.modules()] == modes
    assert all(torch.equal(v, state[k]) for k, v in learn.model.state_dict().items())  # BatchNorm statistics too
    # the report is reproducible (seeded)
    rep2, _ = _report(learn)
    pd.testing.assert_frame_equal(rep['results'], rep2['results'])


def test_report_flags_masked_gradient(digits_dls, digits_model):
    learn = _learn(digits_dls, digits_model)
    masked = Learner(digits_dls, Quantized(learn.model, digits_dls))
    rep, w = _report(masked)
    failed = set(rep['checks'][~rep['checks'].passed].check)
    assert 'black-box Square not clearly stronger than PGD' in failed, rep['checks']
    assert any('Square' in str(o.message) and 'gradient masking' in str(o.message) for o in w)


def test_masking_checks_on_tables():
    "Each check fails on a table that violates it, and passes within `tol`."
    def row(attack, eps, steps, acc, restarts=1): return dict(attack=attack, eps=eps, steps=steps, restarts=restarts, clean_acc=0.9, robust_acc=acc, n=100)
    ok = pd.DataFrame([row('pgd', .1, 5, .50), row('pgd', .1, 10, .45), row('pgd', .05, 10, .70), row('pgd', .2, 10, .10),
                       row('pgd', .1, 10, .44, restarts=3), row('fgsm', .1, 1, .60), row('square', .1, None, .55),
                       row('pgd-unbounded', 1., 10, 0.)])
    assert masking_checks(ok, .1, 10).passed.all()
    def fails(df, check, tol=0.01): c = masking_checks(df, .1, 10, tol); return not c[c.check.str.contains(check)].passed.iloc[0]
    bad = ok.copy(); bad.loc[3, 'robust_acc'] = .6          # more robust at eps=0.2 than at 0.1
    assert fails(bad, 'in eps') and not fails(bad, 'in eps', tol=0.2)
    bad = ok.copy(); bad.loc[0, 'robust_acc'] = .30         # 5 steps stronger than 10
    assert fails(bad, 'in steps')
    bad = ok.copy(); bad.loc[4, 'robust_acc'] = .50         # 3 restarts weaker than 1
    assert fails(bad, 'restarts')
    bad = ok.copy(); bad.loc[5, 'robust_acc'] = .20         # FGSM stronger than PGD
    assert fails(bad, 'FGSM')
    bad = ok.copy(); bad.loc[6, 'robust_acc'] = .20         # Square stronger than PGD
    assert fails(bad, 'Square')
    bad = ok.copy(); bad.loc[7, 'robust_acc'] = .30         # the unbounded attack fails
    assert fails(bad, 'unbounded')


def test_autoattack_at_most_pgd(digits_dls, digits_model):
    learn = _learn(digits_dls, digits_model)
    aa = autoattack_evaluate(learn, eps=0.1, n_batches=1)   # a seeded random sample: the one `in_random_order` gives
    pgd = learn.robust_validate(in_random_order(digits_dls.valid, 0), eps=0.1, steps=20, n_batches=1, show_progress=False)
    assert aa['n'] == pgd['n'] == 128 and aa['clean_acc'] == pgd['clean_acc']
    assert aa['robust_acc'] <= pgd['robust_acc'] + 2/aa['n'], (aa, pgd)
    assert aa['max_perturbation'] <= 0.1 + 1e-6
    assert aa['attack'] == 'autoattack-standard@0.1'


def test_torchattacks_leave_the_model_as_it_was(digits_dls, digits_model):
    "AutoAttack's FAB calls `backward`: no parameter keeps a gradient; modes (a model in training mode) are restored."
    pytest.importorskip('torchattacks')
    learn = _learn(digits_dls, digits_model)
    learn.model.train(); learn.model.block1.eval()
    modes = [m.training for m in learn.model.modules()]
    autoattack_evaluate(learn, eps=0.1, n_batches=1, version='standard')
    square_evaluate(learn, eps=0.1, n_queries=20, n_batches=1)
    assert all(p.grad is None and p.requires_grad for p in learn.model.parameters())
    assert [m.training for m in learn.model.modules()] == modes


def test_pixel_model_matches(digits_dls, digits_model):
    learn = _learn(digits_dls, digits_model)
    x, _ = digits_dls.valid.one_batch()
    p = NormalizeInput.from_stats(digits_dls).to_pixels(x)
    torch.testing.assert_close(PixelModel(learn.model, digits_dls)(p), learn.model(x), rtol=1e-4, atol=1e-4)


def test_missing_torchattacks(digits_dls, digits_model, monkeypatch):
    learn = _learn(digits_dls, digits_model)
    monkeypatch.setitem(sys.modules, 'torchattacks', None)  # `import torchattacks` raises ImportError
    for f in (lambda: autoattack_evaluate(learn, eps=0.1), lambda: square_evaluate(learn, eps=0.1),
              lambda: learn.robustness_report(eps=0.1, autoattack=True)):
        with pytest.raises(ImportError, match=r"optional dependency torchattacks.*pip install --no-deps 'torchattacks==3\.5\.1'"): f()
    # the default report leaves Square out, with a warning that says how to get it
    with pytest.warns(UserWarning, match=r"pip install --no-deps 'torchattacks==3\.5\.1'.*Square attack is left out"):
        rep = learn.robustness_report(eps=0.1, steps=5, n_batches=1, show=False)
    assert 'square' not in set(rep['results'].attack) and 'pgd' in set(rep['results'].attack)
    with warnings.catch_warnings(record=True) as w:   # asked for no Square: no warning about it
        warnings.simplefilter('always')
        rep = learn.robustness_report(eps=0.1, steps=5, n_batches=1, square_queries=None, random_start=False, show=False)
    assert not [x for x in w if 'Square' in str(x.message)]
    assert (rep['results'].restarts == 1).all()   # a fixed start: restarts would repeat the same run, so none



def test_every_row_in_float32_for_a_mixed_precision_learner(digits_dls, digits_model, monkeypatch):
    "A learner under `to_bf16()`: the report's PGD rows run in float32 (`amp=False`), as torchattacks' Square does"
    import fastai.callback.fp16  # noqa: F401  (Learner.to_bf16)
    import rtl_fastai.report as rp
    amps, rv = [], rp.robust_validate
    monkeypatch.setattr(rp, 'robust_validate', lambda *a, **k: (amps.append(k.get('amp')), rv(*a, **k))[1])
    learn, seen = _learn(digits_dls, digits_model).to_bf16(), set()
    conv = next(m for m in learn.model.modules() if isinstance(m, nn.Conv2d))
    h = conv.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    try: _report(learn, square_queries=None, eps_factors=(), steps_list=(2,), restarts=1)
    finally: h.remove()
    assert amps and set(amps) == {False} and seen == {torch.float32}, (amps, seen)


def test_default_sample_is_random_not_the_first_classes(digits_model):
    "A validation set in class order (as fastai's folder loaders keep it): the report's 2 batches are a random sample"
    from rtl_fastai.data.all import load_digits_data, ArrayData, task_dls
    d = load_digits_data()
    o = d.y_valid.argsort(stable=True)
    d = ArrayData(d.x_train, d.y_train, d.x_valid[o], d.y_valid[o], d.classes, 'digits')
    learn = _learn(task_dls(d, bs=16), digits_model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.robustness_report(eps=0.1, steps=2, n_batches=2, square_queries=None, eps_factors=(), restarts=1,
                                show=False)
    assert not [x for x in w if 'classes' in str(x.message)], [str(x.message) for x in w]
    with pytest.warns(UserWarning, match="attacked examples of only"):   # the first 2 batches: 2 classes of 10
        learn.robust_validate(eps=0.1, steps=2, n_batches=2, show_progress=False)


def test_autoattack_iterations(digits_dls, digits_model, monkeypatch):
    "AutoAttack runs 100 iterations unless `steps` is given, also when `threat` is a ThreatModel (its steps are PGD's)."
    pytest.importorskip('torchattacks')
    import rtl_fastai.report as report
    from rtl_fastai.attacks import ThreatModel
    got = []
    monkeypatch.setattr(report, 'torchattack_evaluate', lambda learn, mk, tm, *a, **k: got.append((mk(learn.model), tm)))
    learn = _learn(digits_dls, digits_model)
    for threat, kw, n in ((0.1, {}, 100), (ThreatModel(0.1), {}, 100), (ThreatModel(0.1), dict(steps=7), 7),
                          (0.1, dict(steps=5), 5)):
        got.clear()
        autoattack_evaluate(learn, threat, **kw)
        atk, tm = got[0]
        assert tm.steps == n and {a.steps for a in atk._autoattack.attacks if hasattr(a, 'steps')} == {n}, (threat, kw)
    with pytest.warns(UserWarning, match=r"`threat` has steps=7, PGD's; AutoAttack runs 100 iterations"):
        autoattack_evaluate(learn, ThreatModel(0.1, steps=7))   # steps chosen for PGD: said, not silently dropped


def test_report_on_a_shuffled_loader_attacks_the_same_images(digits_dls, digits_model):
    "A shuffling `dl` (here the training loader) is read in one seeded order: every row sees the same images"
    learn = _learn(digits_dls, digits_model)
    rep, _ = _report(learn, dl=digits_dls.train, square_queries=None)
    pgd = rep['results'][rep['results'].attack.str.startswith('pgd') | (rep['results'].attack == 'fgsm')]
    assert pgd.clean_acc.nunique() == 1, pgd          # the same images: the same clean accuracy in every row
    from torch.utils.data import DataLoader, TensorDataset
    tdl = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match='pass a DataLoader with shuffle=False'): _report(learn, dl=tdl)


def test_report_steps_list_keeps_the_reference(digits_dls, digits_model):
    "A `steps_list` without the reference steps gets them: the checks that compare with the reference run"
    rep, _ = _report(_learn(digits_dls, digits_model), steps_list=(5, 40), square_queries=None)
    assert 10 in set(rep['results'].query("attack == 'pgd'").steps) and len(rep['checks']) == 5


def test_evaluators_check_their_inputs(digits_dls, digits_model):
    "torchattacks' evaluators: the pixel-range warning, labels, an empty loader, and 3 classes for AutoAttack"
    pytest.importorskip('torchattacks')
    from rtl_fastai.attacks import PixelRangeWarning
    learn = _learn(digits_dls, digits_model)
    with pytest.warns(PixelRangeWarning): square_evaluate(learn, 0.1, n_queries=10, n_batches=1, stats=(0.9, 1.0))
    from torch.utils.data import DataLoader
    bare = DataLoader(torch.rand(10, 1, 8, 8), batch_size=5)
    with pytest.raises(ValueError, match=r'\(images, labels\) pairs'): square_evaluate(learn, 0.1, n_queries=10, dl=bare)
    with pytest.raises(ValueError, match='the DataLoader is empty'): square_evaluate(learn, 0.1, n_queries=10, dl=[])
    with pytest.raises(ValueError, match='needs 4 classes or more'): autoattack_evaluate(learn, 0.1, n_out=3)


def test_in_random_order_leaves_python_random():
    "fastai's `DataLoader.new` draws from Python's `random`: the sample order leaves it as it was"
    import random
    dl = task_dls('digits', bs=64).valid
    random.seed(0); r0 = random.random(); random.seed(0)
    in_random_order(dl, seed=1)
    assert random.random() == r0
