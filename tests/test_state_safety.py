"""State safety of our callbacks (issue 8, part 2).

After fit and validate with each callback: the modules' train/eval modes are those of a plain fastai fit, the
`requires_grad` flags are as documented (all trainable, except the frozen blocks of `transfer_learner`), the
BatchNorm buffers of frozen blocks and the source copy of `FeatureDistillation` are unchanged. An exception in
the middle of an epoch leaves the Learner usable and our callbacks removable. `export`/`load_learner` round-trips
with our callbacks attached, and `SaveModelCallback` + `load` resume training.
"""
import pytest
import torch
from fastai.learner import Learner, load_learner
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastai.metrics import accuracy
from rtl_fastai.data.all import task_dls
from rtl_fastai.models import SmallCNN, model_blocks
from rtl_fastai.callback.adv_valid import RobustAccuracy
from rtl_fastai.callback.adv_train import PGDTraining, FreeAdvTraining, FastAdvTraining, TRADESTraining
from rtl_fastai.callback.transfer import transfer_learner
from rtl_fastai.callback.freeze import FreezeBlocks
from rtl_fastai.callback.feature_cache import FeatureCache
from rtl_fastai.callback.distill import FeatureDistillation

torch.set_num_threads(1)


@pytest.fixture
def dls():
    "Fresh digits DataLoaders per test: a callback that leaks a patch onto them cannot affect other tests."
    return task_dls('digits', bs=64, seed=0)


def _model(digits_model):
    m = SmallCNN(); m.load_state_dict(digits_model.state_dict()); return m


def _fit(learn, n=1, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, 1e-3, **kw)


def _modes(model): return {n: m.training for n, m in model.named_modules()}
def _grads(model): return {n: p.requires_grad for n, p in model.named_parameters()}
def _state(module): return {k: v.detach().clone() for k, v in module.state_dict().items()}
def _same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Each setup: `(learner, callbacks passed to fit, what the callback keeps frozen: number of leading entries)`.
def _adv(cls, **kw):
    def make(dls, src):
        return Learner(dls, _model(src), metrics=accuracy), [cls(**kw)], 0
    return make

def _robacc(dls, src):
    return Learner(dls, _model(src), metrics=[accuracy, RobustAccuracy(0.1, steps=2, n_batches=1)]), [], 0

def _transfer(cache):
    def make(dls, src): return transfer_learner(_model(src), dls, n_retrain=1, cache=cache, metrics=accuracy), [], 2
    return make

def _distill(dls, src):
    return Learner(dls, _model(src), metrics=accuracy), [FeatureDistillation(_model(src), lam=1e-2, warmup_epochs=1)], 0

SETUPS = {
    'PGDTraining': _adv(PGDTraining, eps=0.1, steps=2),
    'FreeAdvTraining': _adv(FreeAdvTraining, eps=0.1, replays=2),
    'FastAdvTraining': _adv(FastAdvTraining, eps=0.1),
    'TRADESTraining': _adv(TRADESTraining, eps=0.1, steps=2),
    'RobustAccuracy': _robacc,
    'transfer-cache': _transfer(True),
    'transfer-nocache': _transfer(False),
    'FeatureDistillation': _distill,
}


@pytest.fixture(scope='module')
def reference_modes(digits_dls, digits_model):
    "Modes of every module after a plain fastai fit and after a plain validate."
    learn = Learner(digits_dls, _model(digits_model), metrics=accuracy)
    _fit(learn)
    after_fit = _modes(learn.model)
    learn.validate()
    return after_fit, _modes(learn.model)


@pytest.mark.parametrize('setup', list(SETUPS))
def test_state_after_fit_and_validate(setup, dls, digits_model, reference_modes):
    learn, cbs, n_frozen = SETUPS[setup](dls, digits_model)
    entries = model_blocks(learn.model).all
    frozen_before = [_state(m) for m in entries[:n_frozen]]
    fd = next((c for c in cbs if isinstance(c, FeatureDistillation)), None)
    src_before = _state(fd.source) if fd is not None else None
    n_cbs, n_metrics = len(learn.cbs), len(learn.metrics)
    _fit(learn, 2, cbs=cbs)
    # modes: as after a plain fastai fit (eval after the last validation), frozen blocks in eval mode
    assert _modes(learn.model) == reference_modes[0]
    learn.validate()
    assert _modes(learn.model) == reference_modes[1]
    # requires_grad: everything trainable, but the frozen blocks of transfer_learner
    frozen_ids = {id(p) for m in entries[:n_frozen] for p in m.parameters()}
    for n, p in learn.model.named_parameters(): assert p.requires_grad == (id(p) not in frozen_ids), n
    # frozen blocks: weights and BatchNorm buffers (running mean/var, counter) untouched
    for m, before in zip(entries[:n_frozen], frozen_before): assert _same(_state(m), before)
    # the source copy of FeatureDistillation is never trained, and stays frozen and in eval mode
    if fd is not None:
        assert _same(_state(fd.source), src_before)
        assert not fd.source.training and not any(p.requires_grad for p in fd.source.parameters())
    # callbacks passed to `fit` are gone, metrics and model as they were
    assert len(learn.cbs) == n_cbs and len(learn.metrics) == n_metrics
    assert not any(isinstance(c, (PGDTraining, FreeAdvTraining, FastAdvTraining, TRADESTraining, FeatureDistillation)) for c in learn.cbs)
    assert isinstance(learn.model, SmallCNN)


class Boom(Callback):
    "Raises in the middle of the first epoch (after the loss of batch 3)."
    order, feature_cache_safe = 100, True  # it does not change the inputs: FeatureCache(mode=True) may stay on
    def after_loss(self):
        if self.training and self.iter == 3: raise RuntimeError('boom')


@pytest.mark.parametrize('setup', list(SETUPS))
def test_exception_mid_epoch(setup, dls, digits_model):
    learn, cbs, n_frozen = SETUPS[setup](dls, digits_model)
    grads_before, n_cbs, n_metrics = _grads(learn.model), len(learn.cbs), len(learn.metrics)
    model = learn.model
    with pytest.raises(RuntimeError, match='boom'): _fit(learn, 1, cbs=cbs + [Boom()])
    # the Learner is as before: same model object, flags restored, callbacks of `fit` removed, metrics restored
    assert learn.model is model
    assert _grads(learn.model) == grads_before
    assert len(learn.cbs) == n_cbs and len(learn.metrics) == n_metrics
    assert not any(isinstance(c, Boom) for c in learn.cbs)
    assert 'create_batch' not in vars(learn.dls.train)
    assert 'get_idxs' not in vars(learn.dls.train)
    # ... and usable: fit again with the same callbacks, validate, then remove ours
    _fit(learn, 1, cbs=cbs)
    res = learn.validate()
    assert res[1] > 0.5, res  # accuracy after 1 more epoch from the trained digits model
    ours = [c for c in learn.cbs if isinstance(c, (FreezeBlocks, FeatureCache))]
    learn.remove_cbs(ours)
    assert not any(isinstance(c, (FreezeBlocks, FeatureCache)) for c in learn.cbs)
    _fit(learn, 1)


@pytest.mark.parametrize('setup', list(SETUPS))
def test_export_load_learner(setup, dls, digits_model, tmp_path):
    "export/load_learner with our callbacks attached: the loaded learner predicts the same and keeps them."
    learn, cbs, _ = SETUPS[setup](dls, digits_model)
    learn.add_cbs(cbs)
    learn.path = tmp_path
    _fit(learn, 1)
    x, _ = dls.valid.one_batch()
    with torch.no_grad(): ref = learn.model.eval()(x)
    learn.export('export.pkl')
    new = load_learner(tmp_path/'export.pkl')
    with torch.no_grad(): out = new.model.eval()(x.cpu())
    torch.testing.assert_close(out, ref.cpu())
    names = {type(c).__name__ for c in learn.cbs}
    assert names <= {type(c).__name__ for c in new.cbs}  # our callbacks travel with the export
    # the loaded learner trains again on fresh DataLoaders with them
    new.dls = dls
    _fit(new, 1)


@pytest.mark.parametrize('setup', ['PGDTraining', 'TRADESTraining', 'transfer-cache', 'FeatureDistillation'])
def test_save_model_callback_and_resume(setup, dls, digits_model, tmp_path):
    learn, cbs, n_frozen = SETUPS[setup](dls, digits_model)
    learn.path = tmp_path
    _fit(learn, 2, cbs=cbs + [SaveModelCallback(monitor='valid_loss', fname='best', with_opt=True)])
    assert (tmp_path/'models'/'best.pth').exists()
    best = _state(learn.model)  # SaveModelCallback loads the best model at the end of fit
    # resume: a new learner of the same kind loads the weights and optimizer state, and trains on
    learn2, cbs2, _ = SETUPS[setup](dls, digits_model)
    learn2.path = tmp_path
    learn2.create_opt()
    learn2.load('best', with_opt=True)
    assert _same(_state(learn2.model), best)
    _fit(learn2, 1, cbs=cbs2)
    assert not _same(_state(learn2.model), best)
    for m in model_blocks(learn2.model).all[:n_frozen]:  # frozen blocks still those of the source
        for k, v in _state(m).items(): assert torch.isfinite(v.float()).all()


def test_feature_cache_patch_after_exception(dls, digits_model):
    learn, cbs, _ = SETUPS['transfer-cache'](dls, digits_model)
    with pytest.raises(RuntimeError, match='boom'): _fit(learn, 1, cbs=[Boom()])
    assert 'get_idxs' not in vars(learn.dls.train)


def _within(f, seconds=120):
    "Run `f` in a thread; fail (instead of hanging the suite) if it has not returned after `seconds`"
    import threading
    out = {}
    def run():
        try: out['value'] = f()
        except BaseException as e: out['error'] = e
    t = threading.Thread(target=run, daemon=True); t.start(); t.join(seconds)
    assert not t.is_alive(), f"{getattr(f, '__name__', f)} did not return within {seconds} s (fastai's `Learner.lock`?)"
    if 'error' in out: raise out['error']
    return out.get('value')


def test_nothing_set_up_or_raised_outside_a_fit(dls, digits_model):
    "`validate`, `get_preds` and `predict` fire `before_fit`: our callbacks neither work nor fail there (an error in "
    "`before_fit` leaves fastai's `Learner.lock` held, and the next `get_preds` hangs), and a fit still checks"
    learn = transfer_learner(_model(digits_model), dls, n_retrain=1, cache=True, metrics=accuracy,
                             cbs=[PGDTraining(0.1, steps=2), FastAdvTraining(0.1)])  # two trainers: a fit refuses
    fc = learn.feature_cache
    for f in (learn.validate, learn.get_preds, lambda: learn.predict(dls.valid_ds[0][0]), learn.validate):
        _within(f)
    assert fc.reason == 'not fitted yet' and fc.cached is None  # no forward pass over the training set in `validate`
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match='another adversarial-training callback'):
        learn.fit(1)
    _within(learn.validate)


def test_distillation_outside_a_fit(dls, digits_model):
    "`get_preds` and `validate` run no source forward and add no column; a setup that fails fails the fit"
    src = _model(digits_model)
    calls = []
    learn = Learner(dls, _model(digits_model), metrics=accuracy, cbs=FeatureDistillation(src, lam=1e-3))
    cb = learn.feature_distillation
    cb.source.register_forward_hook(lambda m, i, o: calls.append(1))
    _within(learn.get_preds)
    assert not calls
    bad = Learner(dls, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), metrics=accuracy,
                  cbs=FeatureDistillation(src, lam=1e-3, layer='block1'))
    # a validation runs nothing of the callback: the values of a learner without it, and the lock is left free
    assert len(_within(bad.validate)) == 2 and len(_within(learn.validate)) == 2
    with bad.no_bar(), bad.no_logging(), pytest.raises(Exception, match='block1'): bad.fit(1)
    assert len(_within(bad.validate)) == 2 and not bad.lock.locked()


def test_export_holds_no_data(dls, digits_model, tmp_path):
    "`learn.export()` keeps no images: not the data sets (an empty view would pickle the whole tensor), nor what our "
    "callbacks hold during a fit (the trainers' stats, free AT's perturbation, the cache's loader), even after a fit "
    "an exception ended"
    limit = dls.train_ds.x.nbytes / 4
    learn = Learner(dls, SmallCNN(n_in=1, n_out=dls.c, widths=(8,)))
    learn.export(tmp_path/'x.pkl')
    assert (tmp_path/'x.pkl').stat().st_size < limit
    class Stop(Callback):
        def after_batch(self):
            if self.iter == 1: raise RuntimeError('stop')
    trainers = (PGDTraining(0.1, steps=2), FreeAdvTraining(0.1, replays=2), FastAdvTraining(0.1),
                TRADESTraining(0.1, steps=2), PGDTraining(0.1, steps=2, stats=dls), FastAdvTraining(0.1, stats=dls.train))
    for i, cb in enumerate(trainers):   # `stats=dls`: the callback keeps its (mean, std), not the loaders
        learn = Learner(dls, SmallCNN(n_in=1, n_out=dls.c, widths=(8,)), cbs=cb)
        _fit(learn)
        with pytest.raises(RuntimeError, match='stop'): _fit(learn, cbs=Stop())
        learn.export(tmp_path/f'{i}.pkl')
        assert (tmp_path/f'{i}.pkl').stat().st_size < limit, type(cb).__name__
    learn = Learner(dls, SmallCNN(n_in=1, n_out=dls.c, widths=(8,)), metrics=RobustAccuracy(0.1, steps=2, stats=dls))
    learn.export(tmp_path/'metric.pkl')
    assert (tmp_path/'metric.pkl').stat().st_size < limit
    learn = transfer_learner(_model(digits_model), dls, n_retrain=1, cache=True)
    with pytest.raises(RuntimeError, match='stop'): _fit(learn, cbs=Stop())
    assert learn.feature_cache.active
    learn.export(tmp_path/'cache.pkl')
    assert (tmp_path/'cache.pkl').stat().st_size < limit + 2*sum(p.numel()*4 for p in learn.model.parameters())


def test_freeze_blocks_outside_a_fit(dls):
    "A model that does not fit `n_frozen`: `validate` runs (nothing frozen), the fit raises the clear error"
    learn = Learner(dls, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), cbs=FreezeBlocks(1))
    _within(learn.validate); _within(learn.get_preds)
    with pytest.raises((TypeError, ValueError)): _fit(learn)
    _within(learn.validate)


def test_a_refused_fit_leaves_mixup_working(dls, digits_model):
    "Our callbacks refuse a setting when training starts, after MixUp swapped the loss: it is put back (fastai's "
    "`after_cancel_train`), and the fit the error message advises works"
    from fastai.callback.mixup import MixUp
    learn = Learner(dls, SmallCNN(n_in=1, n_out=dls.c, widths=(8,)), cbs=[MixUp(), PGDTraining(0.1, steps=2)])
    lf = learn.loss_func
    with pytest.raises(ValueError, match='another adversarial-training callback'): _fit(learn, cbs=FastAdvTraining(0.1))
    assert learn.loss_func is lf
    _fit(learn)
    src = Learner(dls, _model(digits_model))
    learn = transfer_learner(src, dls, n_retrain=1, cache=True, cbs=MixUp())
    with pytest.raises(ValueError, match=r'FeatureCache\(mode=True\) cannot be used'): _fit(learn)
    assert learn.loss_func is lf or not hasattr(learn.loss_func, '__self__')   # not MixUp's bound `lf`
    learn.remove_cb(FeatureCache)
    _fit(learn)
    learn = Learner(dls, _model(digits_model), cbs=MixUp())
    with pytest.raises(ValueError, match='precompute'):
        _fit(learn, cbs=FeatureDistillation(_model(digits_model), precompute=True))
    assert not hasattr(learn.loss_func, '__self__')
    _fit(learn)


def test_unfreeze_during_freezeblocks_reaches_the_frozen_entries(dls):
    "`fine_tune` (fastai's freeze, fit, unfreeze, fit) with FreezeBlocks attached: once it is removed, the whole model "
    "trains, as it would have without it"
    from rtl_fastai.callback.freeze import trainable_splitter
    learn = Learner(dls, SmallCNN(n_in=1, n_out=dls.c, widths=(8, 16)), splitter=trainable_splitter, cbs=FreezeBlocks(2))
    w = learn.model.stem.conv.weight
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-3, freeze_epochs=1)
    learn.remove_cb(FreezeBlocks)
    assert learn.opt.frozen_idx == 0 and w.requires_grad
    w0 = w.detach().clone()
    _fit(learn)
    assert not torch.equal(w0, w)
    # without an (un)freeze in between, the flags a user set stay as they were (set before the learner is made:
    # `Learner(cbs=FreezeBlocks(...))` freezes from the start)
    m = SmallCNN(n_in=1, n_out=dls.c, widths=(8, 16))
    m.stem.conv.weight.requires_grad_(False)
    learn = Learner(dls, m, cbs=FreezeBlocks(2))
    _fit(learn)
    learn.remove_cb(FreezeBlocks)
    assert not learn.model.stem.conv.weight.requires_grad and learn.model.block1[0].conv.weight.requires_grad


def test_export_with_a_splitter_that_holds_the_frozen_blocks(dls, tmp_path):
    "fastai's `export` (and `fit(reset_opt=True)`) rebuild the optimizer from `learn.splitter`: with a splitter that "
    "lists the frozen parameters (`trainable_splitter`, `vision_learner`'s), it is the pruned one, so the export works, "
    "keeps Adam's state and the data, and a changed `n_frozen` too; removing FreezeBlocks gives the splitter back"
    from rtl_fastai.callback.freeze import trainable_splitter
    learn = Learner(dls, SmallCNN(n_in=1, n_out=dls.c, widths=(8, 16)), splitter=trainable_splitter,
                    cbs=FreezeBlocks(2), path=tmp_path)
    _fit(learn)
    w, n_train = learn.model.head.weight, len(learn.dls.train)
    learn.export('a.pkl')
    assert 'grad_avg' in learn.opt.state[w] and len(learn.dls.train) == n_train
    new = load_learner(tmp_path/'a.pkl')
    new.dls = dls
    _fit(new)
    assert not new.model.stem.conv.weight.requires_grad   # still frozen after the reload
    learn.freeze_blocks.n_frozen += 1
    _fit(learn)
    learn.export('b.pkl')
    ids = {id(p) for g in learn.opt.param_lists for p in g}
    assert not any(id(p) in ids for p in learn.model.block1.parameters())
    _fit(learn, reset_opt=True)
    assert not any(id(p) in {id(q) for g in learn.opt.param_lists for q in g} for p in learn.model.block1.parameters())
    learn.remove_cb(FreezeBlocks)
    assert learn.splitter is trainable_splitter


def test_freezeblocks_with_torch_style_param_groups(dls):
    "A splitter giving torch's `{'params': ..., 'lr': ...}` groups (fastai's `OptimWrapper`): the frozen ones left out, "
    "each group's own settings kept"
    from functools import partial
    from fastai.optimizer import OptimWrapper
    def dict_splitter(m):
        body = [p for n, p in m.named_parameters() if not n.startswith('head')]
        return [{'params': body, 'lr': 1e-4}, {'params': list(m.head.parameters())}]
    learn = Learner(dls, SmallCNN(n_in=1, n_out=dls.c, widths=(8, 16)), splitter=dict_splitter,
                    opt_func=partial(OptimWrapper, opt=torch.optim.AdamW), cbs=FreezeBlocks(2))
    w = learn.model.stem.conv.weight.detach().clone()
    _fit(learn)
    assert torch.equal(w, learn.model.stem.conv.weight)
    _fit(learn, reset_opt=True)   # the optimizer rebuilt from the splitter: the frozen ones out, the settings kept
    groups = learn.opt.opt.param_groups
    assert not any(p is learn.model.stem.conv.weight for g in groups for p in g['params'])
