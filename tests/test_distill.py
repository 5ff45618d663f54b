"Integration tests of `rtl_fastai.callback.distill.FeatureDistillation` with fastai's training loop."
import warnings
from copy import deepcopy
import pytest
import torch
import torch.nn.functional as F
import torchvision
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation
from fastai.callback.schedule import *  # fit_one_cycle
from fastai.torch_core import set_seed
from rtl_fastai.data.all import task_dls, ArrayData
from rtl_fastai.models import SmallCNN, replace_head, get_features
from rtl_fastai.callback.distill import FeatureDistillation

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def source():
    set_seed(0)
    dls = task_dls('digits', classes='source', bs=64)
    learn = Learner(dls, SmallCNN(n_out=5, widths=(8, 16)), loss_func=CrossEntropyLossFlat())
    learn.fit(1, 1e-2)
    return learn.model.eval()


def target_dls(**kw): return task_dls('digits', classes='target', bs=64, **kw)


def make_learner(source, seed=1, **kw):
    set_seed(seed)
    return Learner(target_dls(), replace_head(deepcopy(source), 5), loss_func=CrossEntropyLossFlat(), **kw)


def state(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}


class Probe(Callback):
    ("Records the first `n` training batches (then stops the fit), the head-input features (own hook) and `loss_grad` "
     "after the callbacks of lower order. On the first batch a student copied from the source has its features: use n > 1 "
     "where the penalty must not be 0")
    def __init__(self, order, module=None, n=1):
        self.order, self.module, self.n, self.recs = order, module, n, []
    def before_fit(self):
        mod = self.module or self.learn.model.head
        self.h = mod.register_forward_pre_hook(lambda m, i: setattr(self, 'f', i[0].detach().float()))
    def after_loss(self):
        if not self.training: return
        self.recs.append(dict(x=self.xb[0], y=self.yb[0], pred=self.learn.pred.detach().float(),
                              loss_grad=self.learn.loss_grad.detach().float().clone(), loss=self.learn.loss.detach().float().clone(), f=self.f))
        if len(self.recs) >= self.n: raise CancelFitException()
    def after_fit(self): self.h.remove()


def test_source_copy_bit_identical(source):
    before = state(source)
    learn = make_learner(source)
    fd = FeatureDistillation(source, lam=1e-2)
    copy_before = state(fd.source)
    learn.fit(2, 1e-2, cbs=fd)
    for k, v in state(fd.source).items(): assert torch.equal(v, copy_before[k]), k
    for k, v in state(source).items(): assert torch.equal(v, before[k]), k
    assert not fd.source.training and not any(p.requires_grad for p in fd.source.parameters())
    ptrs = {t.data_ptr() for t in list(learn.model.parameters()) + list(learn.model.buffers())}
    assert not any(t.data_ptr() in ptrs for t in list(fd.source.parameters()) + list(fd.source.buffers()))
    # the learner's model did train (its weights; its BatchNorm statistics stay the source's: `freeze_bn_stats`)
    assert not torch.equal(learn.model.block1.down.bn.weight, before['block1.down.bn.weight'])
    assert torch.equal(learn.model.block1.down.bn.running_mean, before['block1.down.bn.running_mean'])


def test_source_is_learner_model(source):
    "Passing the learner's own model as source: the copy is frozen at construction time."
    learn = make_learner(source)
    fd = FeatureDistillation(learn.model, lam=1e-2)
    start = state(learn.model)
    learn.fit(1, 1e-2, cbs=fd)
    for k, v in state(fd.source).items(): assert torch.equal(v, start[k]), k


def test_lam0_matches_plain_finetuning(source):
    plain = make_learner(source, seed=5)
    plain.fit_one_cycle(2, 1e-2)
    dist = make_learner(source, seed=5)
    dist.fit_one_cycle(2, 1e-2, cbs=FeatureDistillation(source, lam=0., freeze_bn_stats=False))
    assert [float(l) for l in plain.recorder.losses] == [float(l) for l in dist.recorder.losses]
    for (k, a), b in zip(plain.model.state_dict().items(), dist.model.state_dict().values()): assert torch.equal(a, b), k
    assert plain.recorder.values[-1][:2] == dist.recorder.values[-1][:2]  # train and valid loss


@pytest.mark.parametrize('dist', ['l1', 'l2'])
def test_penalty_by_hand(source, dist):
    "On the 3rd batch: on the 1st the student is the source (BatchNorm statistics frozen), so the penalty is 0 there"
    learn = make_learner(source)
    probe = Probe(order=FeatureDistillation.order + 0.5, n=3)
    learn.fit(1, 1e-2, cbs=[FeatureDistillation(source, lam=0.1, penalty=dist), probe])
    r = probe.recs[-1]
    diff = r['f'] - get_features(source, r['x'])
    d = diff.abs().sum(1) if dist == 'l1' else (diff ** 2).sum(1).sqrt()
    assert d.mean() > 1e-3   # the features moved: the check below is not 0 == 0
    ce = F.cross_entropy(r['pred'], r['y'])
    torch.testing.assert_close(r['loss_grad'], ce + 0.1 * d.mean())
    torch.testing.assert_close(r['loss'], ce + 0.1 * d.mean())



def test_penalty_function(source):
    "`penalty` may be any function of the two float32 feature batches that returns a scalar."
    seen = []
    def cosine(f, fs):
        seen.append((f.dtype, fs.dtype))
        return (1 - F.cosine_similarity(f.flatten(1), fs.flatten(1))).mean()
    learn = make_learner(source)
    probe = Probe(order=FeatureDistillation.order + 0.5, n=3)   # the 3rd batch: on the 1st the penalty is 0
    learn.fit(1, 1e-2, cbs=[FeatureDistillation(source, lam=0.5, penalty=cosine), probe])
    r = probe.recs[-1]
    pen = cosine(r['f'], get_features(source, r['x']))
    assert pen > 1e-6
    torch.testing.assert_close(r['loss_grad'], F.cross_entropy(r['pred'], r['y']) + 0.5 * pen)
    assert seen[0] == (torch.float32, torch.float32)
    with pytest.raises(ValueError, match='must return a scalar'):
        learn.fit(1, cbs=FeatureDistillation(source, penalty=lambda f, fs: (f - fs).abs()))
    assert len(learn.metrics) == 0 and not learn.model.head._forward_hooks

def test_named_layer_by_hand(source):
    learn = make_learner(source)
    probe = Probe(order=FeatureDistillation.order + 0.5, module=None, n=3)   # the 3rd batch: the 1st has a penalty of 0
    feats = {}
    h1 = learn.model.block1.register_forward_hook(lambda m, i, o: feats.__setitem__('f', o.detach()))
    learn.fit(1, 1e-2, cbs=[FeatureDistillation(source, lam=0.01, layer='block1'), probe])
    h1.remove()
    r = probe.recs[-1]
    src_out = {}
    h2 = source.block1.register_forward_hook(lambda m, i, o: src_out.__setitem__('f', o.detach()))
    with torch.no_grad(): source(r['x'])
    h2.remove()
    ce, d = F.cross_entropy(r['pred'], r['y']), (feats['f'] - src_out['f']).flatten(1).abs().sum(1).mean()
    assert d > 1e-3
    torch.testing.assert_close(r['loss_grad'], ce + 0.01 * d)


def test_gradient_accumulation_order(source):
    "The penalty is added before GradientAccumulation divides loss_grad."
    learn = make_learner(source)
    probe_fd = Probe(order=FeatureDistillation.order + 0.5, n=100)  # after the penalty, before GA (order 6)
    probe_ga = Probe(order=GradientAccumulation.order + 0.5)      # after GA
    learn.fit(1, 1e-3, cbs=[FeatureDistillation(source, lam=0.1, freeze_bn_stats=False),  # a penalty from the 1st batch
                          GradientAccumulation(n_acc=128), probe_fd, probe_ga])
    a, b = probe_fd.recs[0], probe_ga.recs[0]
    torch.testing.assert_close(b['loss_grad'], a['loss_grad'] / (128 / 64))
    ce = F.cross_entropy(a['pred'], a['y'])
    assert a['loss_grad'] > ce + 1e-4  # the penalty is in what GA divides


def test_gradient_accumulation_trains(source):
    "With GradientAccumulation the body still trains (the features leave the source's) and both columns are recorded"
    learn = make_learner(source)
    learn.fit(1, 1e-3, cbs=[FeatureDistillation(source, lam=1e-2), GradientAccumulation(n_acc=128)])
    assert learn.recorder.metric_names[3:5] == ['train_distill', 'valid_distill']
    assert not torch.equal(learn.model.stem.conv.weight, source.stem.conv.weight)
    assert all(v > 0 for v in learn.recorder.values[-1][2:4])


def test_to_fp16(source):
    learn = make_learner(source).to_fp16()
    probe = Probe(order=MixedPrecision.order + 0.5, n=3)  # after MixedPrecision left autocast; the 3rd batch
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # on CPU, MixedPrecision warns that CUDA autocast/GradScaler are disabled
        learn.fit(1, 1e-2, cbs=[FeatureDistillation(source, lam=0.1), probe])
    r = probe.recs[-1]
    assert r['loss_grad'].dtype == torch.float32 and torch.isfinite(r['loss_grad'])
    ce, d = F.cross_entropy(r['pred'], r['y']), (r['f'] - get_features(source, r['x'])).abs().sum(1).mean()
    assert d > 1e-3
    torch.testing.assert_close(r['loss_grad'], ce + 0.1 * d)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, 1e-3, cbs=FeatureDistillation(source, lam=1e-2))
    assert all(torch.isfinite(torch.as_tensor(v)) for v in learn.recorder.values[-1])


def _rand_data(n=32, size=16, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayData(torch.rand(n, c, size, size, generator=g), torch.randint(0, 2, (n,), generator=g),
                     torch.rand(16, c, size, size, generator=g), torch.randint(0, 2, (16,), generator=g), ['a', 'b'])


@pytest.mark.parametrize('layer', [None, 'layer3'])
def test_torchvision_resnet(layer):
    set_seed(0)
    src = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    dls = task_dls(_rand_data(), bs=16)
    learn = Learner(dls, replace_head(deepcopy(src), 2), loss_func=CrossEntropyLossFlat())
    before = state(src)
    fd = FeatureDistillation(src, lam=1e-2, layer=layer, warmup_epochs=1 if layer is None else 0)
    learn.fit(2 if layer is None else 1, 1e-3, cbs=fd)
    for k, v in state(fd.source).items(): assert torch.equal(v, before[k]), k
    vals = learn.recorder.values
    assert vals[-1][2] > 0  # distillation column: positive once the body trains
    if layer is None: assert vals[0][2] == 0  # warm start: body = source, no penalty


def test_warmup_restores_user_freeze(source):
    learn = make_learner(source)
    for p in learn.model.stem.parameters(): p.requires_grad_(False)  # frozen by the user
    stem0 = {k: p.detach().clone() for k, p in learn.model.stem.named_parameters()}
    b1 = learn.model.block1.conv.conv.weight.detach().clone()
    learn.fit(2, 1e-2, cbs=FeatureDistillation(source, warmup_epochs=1))
    assert not any(p.requires_grad for p in learn.model.stem.parameters())
    assert all(p.requires_grad for n, p in learn.model.named_parameters() if not n.startswith('stem'))
    for k, p in learn.model.stem.named_parameters(): assert torch.equal(p, stem0[k]), k  # (its BN statistics do move)
    assert not torch.equal(learn.model.block1.conv.conv.weight, b1)  # trained after the warm start


def test_precompute_same_as_per_batch(source):
    a = make_learner(source, seed=3)
    a.fit(2, 1e-2, cbs=FeatureDistillation(source, lam=1e-2))
    fd = FeatureDistillation(source, lam=1e-2, precompute=True)
    b = make_learner(source, seed=3)
    b.fit(2, 1e-2, cbs=fd)
    torch.testing.assert_close(torch.stack(list(a.recorder.losses)), torch.stack(list(b.recorder.losses)), rtol=1e-4, atol=1e-5)
    for va, vb in zip(a.recorder.values, b.recorder.values):
        assert [float(v) for v in va] == pytest.approx([float(v) for v in vb], rel=1e-4, abs=1e-5)
    assert 'create_batch' not in b.dls.train.__dict__  # the DataLoader patch is undone
    n = len(b.dls.train.dataset)
    assert fd._src_feats.shape == (n, 16)
    x = b.dls.train.after_batch(b.dls.train.create_batch(torch.arange(10)))[0]
    torch.testing.assert_close(fd._src_feats[:10], get_features(source, x))



def test_precompute_follows_new_transforms(source):
    "A transform added to the loaders between two fits (`dls.add_tfms`, e.g. a forgotten `Normalize`): the source "
    "features are computed again for the inputs the model now sees, as `FeatureCache` does"
    from fastai.data.transforms import Normalize
    set_seed(1)
    learn = Learner(target_dls(normalize=False), replace_head(deepcopy(source), 5), loss_func=CrossEntropyLossFlat())
    fd = FeatureDistillation(source, lam=1e-2, precompute=True)
    learn.fit(1, 1e-3, cbs=fd)
    before = fd._src_feats.clone()
    learn.dls.add_tfms([Normalize.from_stats([0.3], [0.4], cuda=False)], 'after_batch')
    learn.fit(1, 1e-3, cbs=fd)   # (it failed: the first batch's check found the stale features)
    x = learn.dls.train.after_batch(learn.dls.train.create_batch(torch.arange(10)))[0]
    torch.testing.assert_close(fd._src_feats[:10], get_features(source, x))
    assert not torch.allclose(fd._src_feats[:10], before[:10])


def test_precompute_exported_learner_predicts(source, tmp_path):
    "`validate`, `get_preds` and `predict` fire `before_fit` but train nothing: no precompute there (after `load_learner`"
    "the loaders are empty); the export leaves the precomputed features out, and the next fit computes them again."
    from fastai.learner import load_learner
    fd = FeatureDistillation(source, lam=1e-2, precompute=True)
    learn = make_learner(source, cbs=fd)
    learn.validate()
    assert fd._src_feats is None  # a validation precomputes nothing
    learn.fit(1, 1e-2)
    assert fd._src_feats is not None
    learn.export(tmp_path/'fd.pkl')
    assert fd._src_feats is not None  # the learner's own callback keeps them
    loaded = load_learner(tmp_path/'fd.pkl')
    lfd = next(c for c in loaded.cbs if isinstance(c, FeatureDistillation))
    assert lfd._src_feats is None and not lfd._fitting and 'hooks' not in lfd.__dict__  # no hooks pickled
    item = learn.dls.valid_ds[0][0]
    assert loaded.predict(item)[0] == learn.predict(item)[0]


def test_feature_module_that_never_runs(source):
    "A feature module the forward skips (a frozen block the feature cache replaces, or hooks a compiled model ignores) "
    "is an error, not a fit that silently distils nothing."
    class Skip(torch.nn.Module):
        def __init__(self, m): super().__init__(); self.m, self.unused = m, torch.nn.Identity()
        def forward(self, x): return self.m(x)
    learn = Learner(target_dls(), Skip(replace_head(deepcopy(source), 5)), loss_func=CrossEntropyLossFlat())
    fd = FeatureDistillation(Skip(source), layer='unused')
    with pytest.raises(RuntimeError, match="did not run its feature module .'unused'. in this training batch"):
        learn.fit(1, 1e-3, cbs=fd)
    assert fd.hooks is None and learn.metrics == []  # cleaned up


def test_source_follows_channels_last(source):
    "A channels-last learner gets a channels-last source copy (no format conversion in each source forward)."
    learn = make_learner(source)
    learn.model.to(memory_format=torch.channels_last)
    fd = FeatureDistillation(source, lam=1e-2)
    learn.fit(1, 1e-3, cbs=fd)
    from rtl_fastai.callback.distill import _channels_last
    assert _channels_last(fd.source) and not _channels_last(source)  # the user's source is untouched
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fd.source.parameters() if p.ndim == 4)

def test_precompute_refuses_augmentation():
    src = SmallCNN(n_in=3, n_out=2, widths=(8,))
    dls = task_dls(_rand_data(size=32), bs=16, augment=True)
    learn = Learner(dls, replace_head(deepcopy(src), 2), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match='FlipPadCrop'): learn.fit(1, cbs=FeatureDistillation(src, precompute=True))
    assert len(learn.metrics) == 0
    learn.fit(1, cbs=FeatureDistillation(src, precompute=False))  # per batch is fine
    # a callback of the Learner (not of `fit`), with a warm-up: the failed fit leaves nothing frozen or hooked behind
    fd = FeatureDistillation(src, precompute=True, warmup_epochs=1)
    learn = Learner(dls, replace_head(deepcopy(src), 2), loss_func=CrossEntropyLossFlat(), cbs=fd)
    with pytest.raises(ValueError, match='FlipPadCrop'): learn.fit(2)
    assert all(p.requires_grad for p in learn.model.parameters()) and len(learn.metrics) == 0 and fd.hooks is None


class NoisyInputs(Callback):
    "Changes the training inputs (like adversarial training would)."
    order = 0
    def before_batch(self):
        if self.training: self.learn.xb = (self.xb[0] + 0.5 * torch.randn_like(self.xb[0]),)


def test_precompute_detects_changed_inputs(source):
    learn = make_learner(source)
    with pytest.raises(ValueError, match='differ from the precomputed'):
        learn.fit(1, cbs=[NoisyInputs(), FeatureDistillation(source, precompute=True)])
    assert 'create_batch' not in learn.dls.train.__dict__ and len(learn.metrics) == 0
    # per batch, the source sees the changed inputs too
    probe = Probe(order=FeatureDistillation.order + 0.5, n=3)
    learn.fit(1, 1e-2, cbs=[NoisyInputs(), FeatureDistillation(source, lam=0.1), probe])
    r = probe.recs[-1]
    d = (r['f'] - get_features(source, r['x'])).abs().sum(1).mean()
    assert d > 1e-3
    torch.testing.assert_close(r['loss_grad'], F.cross_entropy(r['pred'], r['y']) + 0.1 * d)


def test_precompute_refuses_input_changers(source):
    "MixUp, CutMix and adversarial training are named before any precomputation; the fit leaves nothing behind."
    from fastai.callback.mixup import MixUp, CutMix
    from rtl_fastai.callback.adv_train import PGDTraining
    for cb in (MixUp(), CutMix(), PGDTraining(eps=0.1, steps=2)):
        learn = make_learner(source)
        fd = FeatureDistillation(source, precompute=True)
        with pytest.raises(ValueError, match=f'`{type(cb).__name__}` changes the training inputs'):
            learn.fit(1, cbs=[cb, fd])
        assert fd._src_feats is None and fd.hooks is None and len(learn.metrics) == 0

def test_shape_mismatch_and_bad_layer(source):
    learn = make_learner(source)
    other = SmallCNN(n_out=5, widths=(8, 32))
    with pytest.raises(ValueError, match=r'shape \(16,\) per example.*\(32,\)'):
        learn.fit(1, cbs=FeatureDistillation(other))
    assert len(learn.metrics) == 0 and not learn.model.head._forward_pre_hooks and not learn.model.head._forward_hooks
    with pytest.raises(ValueError, match="Did you mean 'block1'"): FeatureDistillation(source, layer='blok1')
    with pytest.raises(ValueError, match="`penalty` must be 'l1', 'l2' or a function"): FeatureDistillation(source, penalty='cosine')
    with pytest.raises(TypeError, match='must be an nn.Module'): FeatureDistillation('resnet18')


def test_columns_with_train_metrics(source):
    learn = make_learner(source, metrics=accuracy)
    learn.recorder.train_metrics = True
    learn.fit(1, 1e-3, cbs=FeatureDistillation(source, lam=1e-2))
    names = list(learn.recorder.metric_names)
    assert names == ['epoch', 'train_loss', 'train_accuracy', 'train_distill', 'valid_loss', 'valid_accuracy', 'valid_distill', 'time']
    assert len(learn.metrics) == 1
    assert all(v > 0 for v in (learn.recorder.values[0][2], learn.recorder.values[0][5]))


def test_valid_loss_is_plain(source):
    "valid_loss does not include the penalty: it equals `learn.validate()` (without the callback)."
    learn = make_learner(source)
    learn.fit(1, 1e-3, cbs=FeatureDistillation(source, lam=1.))
    assert learn.recorder.values[0][1] == pytest.approx(learn.validate()[0], rel=1e-5)


class Boom(Callback):
    order = 20
    def after_batch(self):
        if self.training: raise RuntimeError('boom')


def _clean(learn):
    return (len(learn.metrics) == 0 and not learn.model.head._forward_pre_hooks and not learn.model.head._forward_hooks
            and all(p.requires_grad for p in learn.model.parameters()))


def test_crashed_fit_is_cleaned_up(source):
    learn = make_learner(source)
    fd = FeatureDistillation(source, warmup_epochs=1)
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[fd, Boom()])
    assert _clean(learn)  # fastai removed the callback: hooks, columns and warm-up freeze are undone
    # a callback attached to the Learner stays attached after a crash; its next fit cleans up first
    learn = make_learner(source, cbs=FeatureDistillation(source, warmup_epochs=1))
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=Boom())
    learn.fit(1, 1e-3)
    assert _clean(learn) and len(learn.recorder.metric_names) == 6


# -- fastai's own data pipeline: precomputed source features on ImageDataLoaders with a deterministic Resize
def _folder_learner(path, item_tfms, seed=3):
    from fastai.vision.data import ImageDataLoaders
    set_seed(0)
    dls = ImageDataLoaders.from_folder(path, valid='valid', item_tfms=item_tfms, bs=8, num_workers=0, device='cpu')
    set_seed(seed)
    return Learner(dls, SmallCNN(n_in=3, n_out=3, widths=(8, 16)), loss_func=CrossEntropyLossFlat())

def test_precompute_on_image_dataloaders(tmp_path):
    "Issue 12: `precompute=True` works on `ImageDataLoaders.from_folder(..., item_tfms=Resize(64, method='squish'))`."
    from fastai.vision.augment import Resize
    from rtl_fastai.data.folder import make_image_folder
    from rtl_fastai.models import pooled_features
    path = make_image_folder(tmp_path/'shapes', n_per_class=8, n_valid=4, classes=3, size=48)
    set_seed(0)
    src = SmallCNN(n_in=3, n_out=3, widths=(8, 16)).eval()
    squish = Resize(64, method='squish')
    a = _folder_learner(path, squish)
    with a.no_bar(), a.no_logging(): a.fit(2, 1e-2, cbs=FeatureDistillation(src, lam=1e-2))
    fd = FeatureDistillation(src, lam=1e-2, precompute=True)
    b = _folder_learner(path, squish)
    with b.no_bar(), b.no_logging(): b.fit(2, 1e-2, cbs=fd)
    torch.testing.assert_close(torch.stack(list(a.recorder.losses)), torch.stack(list(b.recorder.losses)), rtol=1e-4, atol=1e-5)
    assert fd._src_feats.shape == (24, 16)
    x = torch.cat([xb for xb, _ in b.dls.train.new(shuffle=False, drop_last=False)])
    assert x.shape == (24, 3, 64, 64)
    torch.testing.assert_close(fd._src_feats, pooled_features(src, x))
    # the default Resize crops at random in training: refused, with the transform named
    c = _folder_learner(path, Resize(64))
    with pytest.raises(ValueError, match=r"precompute=True.*Resize\(method='crop'\)"), c.no_bar(), c.no_logging():
        c.fit(1, cbs=FeatureDistillation(src, precompute=True))


def test_pooled_penultimate_is_the_head_input_for_our_models():
    "The default feature (the pooled penultimate vector) is the head's input for our BlockNet models: the experiments "
    "recorded with the earlier default (the head's input) distil the same thing."
    from rtl_fastai.models import PreActResNet18, WideResNet, pooled_features
    set_seed(0)
    for m, x in ((SmallCNN(widths=(8, 16)), torch.rand(4, 1, 28, 28)), (PreActResNet18(width=4), torch.rand(4, 3, 32, 32)),
                 (WideResNet(depth=10, widen=1), torch.rand(4, 3, 32, 32))):
        assert torch.equal(pooled_features(m, x), get_features(m, x))  # bit for bit


def test_source_runs_in_the_callers_precision(source):
    "Inside an autocast (fastai's, in a fit) the source's forward is reduced too; `exact=True` (precompute) is float32"
    cb, seen = FeatureDistillation(source, lam=1e-3), []
    conv = next(m for m in cb.source.modules() if isinstance(m, torch.nn.Conv2d))
    h = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.rand(4, 1, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        f, f32 = cb.source_features(x), cb.source_features(x, exact=True)
    h.remove()
    assert seen == [torch.bfloat16, torch.float32] and f.dtype == f32.dtype == torch.float32
    torch.testing.assert_close(f, f32, rtol=0.05, atol=0.05)


class CtrlC(Callback):
    "A Ctrl-C (KeyboardInterrupt) after the loss of training batch `at`: no fastai event runs after it"
    order = 100
    def __init__(self, at): self.at = at
    def after_loss(self):
        if self.training and self.iter == self.at: raise KeyboardInterrupt


def _warned(fit):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); fit()
    return [str(x.message) for x in w if "no longer hold the source's statistics" in str(x.message)]


def test_statistics_moved_by_an_earlier_fit_are_said(source):
    "A head-only fit without the callback (`learn.freeze()` keeps BatchNorm training) moves the body's statistics: "
    "`freeze_bn_stats` cannot keep the source's in the next fit, and says so; `fine_tune` with the callback keeps them"
    from rtl_fastai.callback.transfer import transfer_learner   # (its splitter: `freeze()` leaves the head)
    learn = transfer_learner(source, target_dls(), n_retrain='all', cache=False)
    learn.freeze()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    learn.unfreeze()
    with learn.no_bar(), learn.no_logging():
        assert _warned(lambda: learn.fit_one_cycle(1, 1e-3, cbs=FeatureDistillation(source, lam=5e-3)))
    bn = 'block1.down.bn.running_mean'
    learn = transfer_learner(source, target_dls(), n_retrain='all', cache=False)
    with learn.no_bar(), learn.no_logging():
        assert not _warned(lambda: learn.fine_tune(1, freeze_epochs=1, cbs=FeatureDistillation(source, lam=5e-3)))
    assert torch.equal(learn.model.state_dict()[bn], source.state_dict()[bn])
    scratch = Learner(target_dls(), SmallCNN(n_out=5, widths=(8, 16)), loss_func=CrossEntropyLossFlat())  # not from
    with scratch.no_bar(), scratch.no_logging():                                                        # the source:
        assert not _warned(lambda: scratch.fit(1, 1e-3, cbs=FeatureDistillation(source, lam=5e-3)))     # its own stats


def test_interrupted_warmup_then_export(source, tmp_path):
    "Ctrl-C in the warm start of a callback attached to the Learner (no event runs after it): `learn.export()` puts "
    "the frozen flags back before it rebuilds the optimizer from the trainable parameters (it failed, and left "
    "`learn.dls` empty); the export holds no live hook, and the next fits train the whole model"
    from fastai.learner import load_learner
    learn = make_learner(source, metrics=accuracy, cbs=FeatureDistillation(source, lam=1e-3, warmup_epochs=1))
    learn.path = tmp_path
    flags = [p.requires_grad for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging(), pytest.raises(KeyboardInterrupt): learn.fit(2, 1e-3, cbs=CtrlC(2))
    assert [p.requires_grad for p in learn.model.parameters()] != flags   # the warm start's, left by the Ctrl-C
    n_train = len(learn.dls.train)
    learn.export('x.pkl')
    assert len(learn.dls.train) == n_train and [p.requires_grad for p in learn.model.parameters()] == flags
    loaded = load_learner(tmp_path/'x.pkl')
    x = learn.dls.valid.one_batch()[0][:4].cpu()
    loaded.model.eval(); learn.model.eval()
    with torch.no_grad(): torch.testing.assert_close(loaded.model(x), learn.model(x))
    # the hooks the Ctrl-C left on the model travel with it, off: a copy's body trains, the loaded learner's too
    from rtl_fastai.callback.transfer import transfer_learner
    for l in (transfer_learner(learn.model, target_dls(), n_retrain='all', cache=False), loaded):
        if l is loaded: l.dls = target_dls(); l.remove_cb(l.feature_distillation)
        w0 = l.model.stem.conv.weight.detach().clone()
        with l.no_bar(), l.no_logging(): l.fit(1, 1e-2)
        assert not torch.equal(l.model.stem.conv.weight, w0)
    body0 = learn.model.stem.conv.weight.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)   # the warm start again (epoch 0), then all of it
    assert not torch.equal(learn.model.stem.conv.weight, body0)
    assert [p.requires_grad for p in learn.model.parameters()] == flags


def test_warm_start_with_a_head_called_in_parts():
    "A declared head (`set_blocks`) the forward calls in parts, not as one module: the warm start still trains only "
    "the head (the body's flags are off); inputs keep their gradients, so attacks in the warm start work"
    from rtl_fastai.models import set_blocks
    from rtl_fastai.callback.adv_valid import RobustAccuracy
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.block = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.drop, self.fc = torch.nn.Dropout(0.), torch.nn.Linear(8, 5)
        def forward(self, x): return self.fc(self.drop(self.block(torch.relu(self.conv(x))).mean((2, 3))))
    def make():
        m = Net(); return set_blocks(m, stem=m.conv, blocks=[m.block], head=torch.nn.Sequential(m.drop, m.fc))
    src = make()
    learn = Learner(target_dls(), make(), loss_func=CrossEntropyLossFlat(), metrics=RobustAccuracy(0.1, steps=2, n_batches=1))
    learn.model.load_state_dict(src.state_dict())
    w0, h0 = learn.model.conv.weight.detach().clone(), learn.model.fc.weight.detach().clone()
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')   # (a warm start as long as the fit: warned, on purpose here)
        learn.fit(1, 1e-2, cbs=FeatureDistillation(src, lam=1e-2, layer='block', warmup_epochs=1))
    assert torch.equal(learn.model.conv.weight, w0) and not torch.equal(learn.model.fc.weight, h0)
    assert learn.recorder.values[-1][-1] is not None   # the attack of the validation, inside the warm start


def test_unfreeze_after_an_interrupted_warm_start_stands(source):
    "Ctrl-C in the warm start, then the user's `learn.unfreeze()`: the callback's clean-up at the next fit does not "
    "put back the flags it saved under `learn.freeze()` (the body then never trained, silently)"
    from rtl_fastai.callback.transfer import transfer_learner
    learn = transfer_learner(source, target_dls(), n_retrain='all', cache=False)
    learn.add_cb(FeatureDistillation(source, lam=1e-3, warmup_epochs=1))
    learn.freeze()
    with learn.no_bar(), learn.no_logging(), pytest.raises(KeyboardInterrupt): learn.fit(2, 1e-3, cbs=CtrlC(1))
    learn.unfreeze()
    w0 = learn.model.stem.conv.weight.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-2)
    assert learn.model.stem.conv.weight.requires_grad and not torch.equal(w0, learn.model.stem.conv.weight)


def test_distill_columns_are_the_mean_penalty_per_example(source):
    ("train_distill is the example-weighted mean of lam*d over the epoch's training batches; valid_distill is lam*d of "
     "the final model on the validation set, computed by hand")
    learn = make_learner(source)
    fd, seen = FeatureDistillation(source, lam=0.1, freeze_bn_stats=False), []
    class Rec(Callback):
        order = FeatureDistillation.order + 0.5
        def after_loss(self):
            if self.training and fd.batch_term is not None: seen.append((float(fd.batch_term), len(self.yb[0])))
    learn.fit(1, 1e-2, cbs=[fd, Rec()])
    names, vals = learn.recorder.metric_names[1:-1], learn.recorder.values[-1]
    assert vals[names.index('train_distill')] == pytest.approx(sum(t*b for t, b in seen) / sum(b for _, b in seen), rel=1e-5)
    tot, n = 0., 0
    with torch.no_grad():
        for xb, _ in learn.dls.valid:
            d = (get_features(learn.model, xb) - get_features(source, xb)).abs().sum(1)
            tot, n = tot + 0.1*d.sum().item(), n + len(d)
    assert tot > 0 and vals[names.index('valid_distill')] == pytest.approx(tot/n, rel=1e-4)


def test_lr_find_searches_the_whole_model(source, tmp_path):
    "`lr_find` with a warm start: no warm start there (its one-epoch search would find the head's rate alone); the "
    "flags are as before after it, and the next fit warms up as asked"
    learn = make_learner(source, path=tmp_path)
    fd = FeatureDistillation(source, lam=1e-2, warmup_epochs=1)
    learn.add_cb(fd)
    from rtl_fastai.models import head_module
    head = {id(p) for p in head_module(learn.model).parameters()}
    seen = []
    class Spy(Callback):
        order = 100
        def before_batch(self):
            if self.training: seen.append(any(p.requires_grad for p in self.learn.model.parameters() if id(p) not in head))
    learn.add_cb(Spy())
    flags = [p.requires_grad for p in learn.model.parameters()]
    with learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter('ignore'); learn.lr_find(num_it=20, show_plot=False)
    assert seen and all(seen)   # the body trained in every batch of the search
    assert [p.requires_grad for p in learn.model.parameters()] == flags
    seen.clear()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    n = len(learn.dls.train)
    assert not any(seen[:n]) and all(seen[n:])   # a fit: the first epoch is the head's alone
