"Integration and bad-input tests of frozen-block robust transfer: `rtl_fastai.callback.transfer`, `.freeze`, `.feature_cache`."
import warnings
import pytest
import torch
import torchvision
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.vision.learner import vision_learner
from fastai.metrics import accuracy
from rtl_fastai.data.all import task_dls, load_digits_data, select_classes, ArrayData
from rtl_fastai.models import SmallCNN, model_blocks, head_module
from rtl_fastai.callback.freeze import FreezeBlocks, n_frozen_entries
from rtl_fastai.callback.feature_cache import FeatureCache
from rtl_fastai.callback.transfer import transfer_learner
from rtl_fastai.checkpoint import CheckpointMismatchError

torch.set_num_threads(1)


def _fit(learn, n=1, lr=1e-2, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, lr, **kw)
    return learn


@pytest.fixture(scope='module')
def digits():
    "A naturally trained SmallCNN on digits 0-4 and the 5-9 target DataLoaders (model takes [0,1] pixels)."
    set_seed(0)
    src = SmallCNN(widths=(16, 32, 64), n_out=5, stats=([0.3], [0.4]))
    _fit(Learner(task_dls('digits', classes='source', normalize=False), src), 2)
    return src.eval(), task_dls('digits', classes='target', bs=64, normalize=False)



def _frozen_state(learn, n_frozen):
    return {f'{i}.{k}': v.clone() for i, m in enumerate(model_blocks(learn.model).all[:n_frozen])
            for k, v in m.state_dict().items()}


@pytest.mark.parametrize('n_retrain', [0, 1, 2])
@pytest.mark.parametrize('cache', [True, False])
def test_frozen_bit_identical_trainable_changed(digits, n_retrain, cache):
    src, dls = digits
    learn = transfer_learner(src, dls, n_retrain=n_retrain, hidden=(16,), p_drop=0.1, cache=cache)
    nf = n_frozen_entries(learn.model, n_retrain)
    frozen0 = _frozen_state(learn, nf)
    train0 = {n: p.clone() for n, p in learn.model.named_parameters() if p.requires_grad}
    bn0 = {n: b.clone() for n, b in learn.model.named_buffers()}
    _fit(learn, 2)
    assert learn.feature_cache.active == cache
    frozen1 = _frozen_state(learn, nf)
    assert frozen0.keys() == frozen1.keys() and len(frozen0) > 0
    for k in frozen0: assert torch.equal(frozen0[k], frozen1[k]), k          # weights and BN buffers
    params = dict(learn.model.named_parameters())
    for n, p in train0.items():
        if p.ndim > 1: assert not torch.equal(p, params[n]), n                # every trainable weight moved
    # BN statistics of trainable BN layers did update (they train in train mode)
    bufs = dict(learn.model.named_buffers())
    trainable_bn = [n for n in bn0 if n.endswith('running_mean') and params[n.replace('running_mean', 'weight')].requires_grad]
    assert trainable_bn and all(not torch.equal(bn0[n], bufs[n]) for n in trainable_bn)
    # the optimizer holds exactly the trainable parameters, in one group per trainable entry
    opt_ids = [id(p) for p, *_ in learn.opt.all_params()]
    assert sorted(opt_ids) == sorted(id(p) for p in learn.model.parameters() if p.requires_grad)
    assert set(map(id, learn.opt.state)) <= set(opt_ids)
    assert len(learn.opt.param_lists) == n_retrain + 1
    # documented state after fit: frozen entries in eval mode with requires_grad False
    for m in model_blocks(learn.model).all[:nf]:
        assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_frozen_stay_eval_during_training(digits):
    src, dls = digits
    seen = []
    class Spy(Callback):
        order, run_valid = 50, False
        def before_batch(self): seen.append((self.learn.model.block1.training, self.learn.model.block3.training))
    learn = transfer_learner(src, dls, n_retrain=1, cbs=Spy(), cache=False)
    _fit(learn)
    assert seen and all(s == (False, True) for s in seen)


def test_validation_runs_full_model(digits):
    "With the cache on, training batches run only the trained suffix (the frozen stem sees empty batches), validation the full model."
    src, dls = digits
    seen = {True: set(), False: set()}
    class Spy(Callback):
        order, hs = FeatureCache.order + 1, None  # its hooks go on after the cache is built (first `before_train`)
        def before_train(self):
            if self.hs is None: self.hs = [getattr(self.learn.model, n).register_forward_hook(
                           lambda m, i, o, n=n: seen[self.learn.training].add((n, len(i[0]) > 0))) for n in ('stem', 'block3')]
        def after_fit(self):
            for h in self.hs: h.remove()
    learn = transfer_learner(src, dls, n_retrain=1, cbs=Spy())
    model = learn.model
    _fit(learn)
    assert learn.feature_cache.active
    assert seen[True] == {('stem', False), ('block3', True)}   # training: the cached features reach block3
    assert seen[False] == {('stem', True), ('block3', True)}   # validation: the full model on the images
    assert learn.model is model and type(model) is SmallCNN
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_source_untouched_and_new_head(digits):
    src, dls = digits
    before = {k: v.clone() for k, v in src.state_dict().items()}
    learn = _fit(transfer_learner(src, dls, n_retrain='all'))
    for k, v in src.state_dict().items(): assert torch.equal(v, before[k]), k
    assert learn.model is not src and head_module(learn.model).out_features == dls.c
    assert all(p.requires_grad for p in learn.model.parameters())
    assert len(learn.opt.param_lists) == 5  # stem, 3 blocks, head
    assert learn.feature_cache.active is False and 'nothing is frozen' in learn.feature_cache.reason


@pytest.mark.parametrize('kw', [dict(n_retrain=0), dict(n_retrain=1), dict(n_retrain=1, hidden=(32,), p_drop=0.3)])
def test_cache_agrees_with_uncached(digits, kw):
    src, _ = digits
    res = []
    for cache in (True, False):
        set_seed(3)
        learn = transfer_learner(src, task_dls('digits', classes='target', bs=64, normalize=False, seed=3),
                                 cache=cache, metrics=accuracy, **kw)
        _fit(learn, 3)
        assert learn.feature_cache.active == cache
        res.append((learn.model.state_dict(), learn.validate()))
    (sa, va), (sb, vb) = res
    for k in sa: torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=1e-4, atol=1e-5, msg=k)
    assert abs(va[1] - vb[1]) < 1e-6



def _datablock_dls(seed, bs=50):
    "Digits 5-9 through fastai's own `DataBlock` (a `TfmdDL`, shuffled, `drop_last`), not our `ArrayDL`."
    from fastai.data.block import DataBlock, CategoryBlock, TransformBlock
    from fastai.data.transforms import IndexSplitter
    from fastai.torch_core import TensorImage
    d = select_classes(load_digits_data(), list('56789'))
    x, y = torch.cat([d.x_train, d.x_valid]), torch.cat([d.y_train, d.y_valid])
    if x.dtype == torch.uint8: x = x.float() / 255
    n_train = len(d.y_train)
    dblock = DataBlock(blocks=(TransformBlock(type_tfms=lambda i: TensorImage(x[i])), CategoryBlock),
                       get_y=lambda i: int(y[i]), splitter=IndexSplitter(range(n_train, len(y))))
    set_seed(seed)
    dls = dblock.dataloaders(list(range(len(y))), bs=bs, device='cpu')
    assert dls.train.shuffle and dls.train.drop_last and len(dls.train.dataset) % bs
    return dls


def test_cache_agrees_with_uncached_fastai_datablock(digits):
    "The cache finds each batch's items on fastai's own TfmdDL too (shuffle, drop_last): same model as without it."
    src, _ = digits
    res = []
    for cache in (True, False):
        dls = _datablock_dls(seed=4)
        set_seed(4)
        learn = _fit(transfer_learner(src, dls, n_retrain=1, cache=cache), 2)
        assert learn.feature_cache.active == cache, learn.feature_cache.reason
        res.append(learn.model.state_dict())
    for k in res[0]: torch.testing.assert_close(res[0][k].float(), res[1][k].float(), rtol=1e-4, atol=1e-5, msg=k)

def test_cache_reused_and_invalidated(digits):
    src, dls = digits
    learn = transfer_learner(src, dls, n_retrain=1)
    _fit(learn)
    feats = learn.feature_cache.cached
    _fit(learn)
    assert learn.feature_cache.cached is feats          # same train set, same frozen weights: reused
    with torch.no_grad(): learn.model.block1.down.conv.weight.mul_(0.5)   # e.g. loading other weights
    _fit(learn)
    assert learn.feature_cache.cached is not feats
    assert learn.model.__class__ is SmallCNN and 'get_idxs' not in vars(learn.dls.train)  # restored after fit


def test_cache_off_with_augmentation_or_input_callbacks(digits, digits_rgb32):
    src, dls = digits
    from rtl_fastai.callback.adv_train import PGDTraining
    learn = _fit(transfer_learner(src, dls, cbs=PGDTraining(eps=0.2, steps=2)))
    assert not learn.feature_cache.active and 'PGDTraining' in learn.feature_cache.reason
    with pytest.raises(ValueError, match='PGDTraining'):
        _fit(transfer_learner(src, dls, cache=True, cbs=PGDTraining(eps=0.2, steps=2)))
    data = digits_rgb32
    aug = task_dls(data, bs=16, normalize=False, augment=True)
    tv = torchvision.models.resnet18(weights=None, num_classes=3)
    learn = _fit(transfer_learner(tv, aug, n_retrain=0))
    assert not learn.feature_cache.active and 'FlipPadCrop' in learn.feature_cache.reason


def test_torchvision_resnet18(digits_rgb32):
    set_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=3)
    dls = task_dls(digits_rgb32, bs=16)
    for n_retrain, n_groups in ((0, 1), (3, 4), ('all', 6)):
        learn = transfer_learner(tv, dls, n_retrain=n_retrain)
        nf = n_frozen_entries(learn.model, n_retrain)
        frozen0 = _frozen_state(learn, nf)
        _fit(learn)
        assert learn.model.fc.out_features == 5 and len(learn.opt.param_lists) == n_groups
        for k, v in _frozen_state(learn, nf).items(): assert torch.equal(v, frozen0[k]), k
        assert learn.feature_cache.active == (n_retrain != 'all')
    assert tv.fc.out_features == 3  # the source kept its head
    with pytest.raises(ValueError, match=r"0\.\.4"): transfer_learner(tv, dls, n_retrain=5)


def test_vision_learner_source(digits_rgb32):
    set_seed(0)
    dls = task_dls(digits_rgb32, bs=16)
    src = vision_learner(dls, torchvision.models.resnet18, pretrained=False, n_out=3)
    learn = transfer_learner(src, dls, n_retrain=1, hidden=(32,), p_drop=0.2)
    frozen0 = _frozen_state(learn, 4)
    _fit(learn)
    for k, v in _frozen_state(learn, 4).items(): assert torch.equal(v, frozen0[k]), k
    assert learn.feature_cache.active  # fastai's head pools inside the head: the cache holds the body's maps
    lin = [m for m in learn.model[1].modules() if isinstance(m, torch.nn.Linear)]
    assert [l.out_features for l in lin] == [32, 5]
    assert len(learn.opt.param_lists) == 2  # last body block, head
    with pytest.raises(ValueError, match=r"0\.\.4"): transfer_learner(src, dls, n_retrain=7)
    # `p_drop` is fastai's `ps` (fastai halves all dropouts but the last); None keeps fastai's own (0.25, 0.5)
    drops = lambda l: [m.p for m in l.model[1].modules() if isinstance(m, torch.nn.Dropout)]
    assert drops(transfer_learner(src, dls, p_drop=0.1, cache=False)) == [0.05, 0.1]
    assert drops(transfer_learner(src, dls, cache=False)) == [0.25, 0.5]
    assert drops(transfer_learner(src, dls, p_drop=0., cache=False)) == []  # fastai adds no Dropout(0)
    assert drops(transfer_learner(src, dls, hidden=(16,), p_drop=[0.1, 0.2], cache=False)) == [0.1, 0.2]  # a list


def test_vision_learner_head_only_caches_the_pooled_features(digits_rgb32):
    "fastai's head starts with its pool and flatten: with n_retrain=0 the cache holds the pooled vector (512*2 for "
    "a ResNet-18 and fastai's concat pool), not the body's maps, and training is the same as without the cache"
    src = vision_learner(task_dls(digits_rgb32, bs=16), torchvision.models.resnet18, pretrained=False, n_out=3)
    def run(cache):
        set_seed(0)
        learn = transfer_learner(src, task_dls(digits_rgb32, bs=16), n_retrain=0, cache=cache)  # the same shuffles
        _fit(learn)
        return learn
    a, b = run('auto'), run(False)
    assert a.feature_cache.active and tuple(a.feature_cache.cached.shape[1:]) == (1024,), a.feature_cache.reason
    assert 'BatchNorm1d' in a.feature_cache.reason
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()): assert torch.equal(v, w), k


@pytest.mark.parametrize('bad', [-1, 4, 2.0, True, 'some', None])
def test_n_retrain_out_of_range(digits, bad):
    src, dls = digits
    with pytest.raises(ValueError, match=r"integer in 0\.\.3 .* or 'all'"): transfer_learner(src, dls, n_retrain=bad)


def test_bad_inputs(digits):
    src, dls = digits
    with pytest.raises(TypeError, match='source'): transfer_learner('model.pth', dls)
    with pytest.raises(ValueError, match='mode'): FeatureCache('yes')
    with pytest.raises(ValueError, match='p_drop'): transfer_learner(src, dls, hidden=(8,), p_drop=1.5)
    with pytest.raises(ValueError, match='give `hidden`'): transfer_learner(src, dls, p_drop=0.2)  # no hidden layer
    with pytest.raises(ValueError, match='fastai heads'): transfer_learner(src, dls, hidden=(8,), p_drop=[0.1, 0.2])
    with pytest.raises(CheckpointMismatchError, match='architecture'):
        transfer_learner(src, dls, weights=SmallCNN(n_out=7).state_dict())
    learn = Learner(dls, SmallCNN(n_out=5, widths=(8, 16)), cbs=FreezeBlocks(5))
    with pytest.raises(ValueError, match=r'0\.\.4'): _fit(learn)
    with pytest.warns(UserWarning, match='normalized twice'):
        transfer_learner(src, task_dls('digits', classes='target', normalize=True))


def test_freeze_blocks_plain_learner_prunes_optimizer(digits):
    "FreezeBlocks on an ordinary Learner (fastai's own splitter, train_bn) keeps frozen BN params out of the optimizer."
    src, dls = digits
    from rtl_fastai.models import block_splitter
    import copy
    m = copy.deepcopy(src)
    class OptSpy(Callback):
        def after_batch(self): self.ids = {id(p) for p, *_ in self.learn.opt.all_params()}
    spy = OptSpy()
    learn = Learner(dls, m, splitter=block_splitter, cbs=[FreezeBlocks(2), spy])
    learn.freeze_to(1)   # fastai keeps BN params of frozen groups trainable (train_bn)
    frozen0 = {k: v.clone() for k, v in m.block1.state_dict().items()}
    _fit(learn)
    for k, v in m.block1.state_dict().items(): assert torch.equal(v, frozen0[k]), k
    frozen_ids = {id(p) for e in (m.stem, m.block1) for p in e.parameters()}
    assert not frozen_ids & spy.ids   # out of the optimizer during the fit
    assert not frozen_ids & {id(p) for p, *_ in learn.opt.all_params()}   # and after it


# -- fastai's own data pipeline: ImageDataLoaders.from_folder with a deterministic Resize
@pytest.fixture(scope='module')
def shapes_folder(tmp_path_factory):
    from rtl_fastai.data.folder import make_image_folder
    return make_image_folder(tmp_path_factory.mktemp('f')/'shapes', n_per_class=8, n_valid=4, classes=3, size=48)

def _folder_dls(path, item_tfms):
    from fastai.vision.data import ImageDataLoaders
    set_seed(0)
    return ImageDataLoaders.from_folder(path, valid='valid', item_tfms=item_tfms, bs=8, num_workers=0, device='cpu')

def _folder_fit(path, item_tfms, cache, n_retrain=1):
    dls = _folder_dls(path, item_tfms)
    set_seed(1)
    learn = transfer_learner(SmallCNN(n_in=3, n_out=4, widths=(8, 16, 32)), dls, n_retrain=n_retrain, cache=cache)
    return _fit(learn, 2, 1e-2)

def test_image_folder_deterministic_resize_gets_the_cache(shapes_folder):
    "Issue 12: `ImageDataLoaders.from_folder(..., item_tfms=Resize(64, method='squish'))`: the cache is on and agrees."
    from fastai.vision.augment import Resize
    a, b = _folder_fit(shapes_folder, Resize(64, method='squish'), True), _folder_fit(shapes_folder, Resize(64, method='squish'), False)
    assert a.feature_cache.active and not b.feature_cache.active
    assert len(a.feature_cache.cached) == len(a.dls.train.dataset) == 24
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(va.float(), vb.float(), rtol=1e-4, atol=1e-4, msg=k)

def test_auto_cache_off_says_why_in_one_line(shapes_folder):
    from fastai.vision.augment import Resize
    learn = transfer_learner(SmallCNN(n_in=3, n_out=4, widths=(8, 16, 32)), _folder_dls(shapes_folder, Resize(40)),
                             n_retrain=1)
    lines = []
    learn.logger = lines.append
    with learn.no_bar(): learn.fit(1, 1e-3)
    said = [l for l in lines if isinstance(l, str) and l.startswith('FeatureCache')]
    assert len(said) == 1 and "randomly augmented (Resize(method='crop'))" in said[0] and '\n' not in said[0], said
    assert not learn.feature_cache.active and 'Resize' in learn.feature_cache.reason
    # silent: under no_logging, with mode=False, and when nothing is frozen (no cache to speak of)
    for kw in (dict(), dict(cache=False), dict(n_retrain='all')):
        l2 = transfer_learner(SmallCNN(n_in=3, n_out=4, widths=(8, 16, 32)), learn.dls, **kw)
        out = []
        l2.logger = out.append
        with l2.no_bar():
            if kw: l2.fit(1, 1e-3)
            else:
                with l2.no_logging(): l2.fit(1, 1e-3)
        assert not [l for l in out if isinstance(l, str) and l.startswith('FeatureCache')], (kw, out)

def test_a_users_own_transform_keeps_the_auto_cache_off(shapes_folder):
    "A batch transform of the user's (here random noise, not a `RandTransform`): 'auto' stays off and names it; "
    "cache=True (the user vouches for it) caches"
    from fastai.vision.augment import Resize
    from fastai.data.transforms import Transform
    from fastai.torch_core import TensorImage
    class GaussNoise(Transform):
        order = 99
        def encodes(self, x:TensorImage): return x + 0.1*torch.randn_like(x)
    dls = _folder_dls(shapes_folder, Resize(40, method='squish'))
    dls.add_tfms([GaussNoise()], 'after_batch')
    learn = _fit(transfer_learner(SmallCNN(n_in=3, n_out=4, widths=(8, 16, 32)), dls, n_retrain=1), 1, 1e-3)
    assert not learn.feature_cache.active and 'GaussNoise' in learn.feature_cache.reason
    assert 'FeatureCache(mode=True)' in learn.feature_cache.reason
    learn = _fit(transfer_learner(SmallCNN(n_in=3, n_out=4, widths=(8, 16, 32)), dls, n_retrain=1, cache=True), 1, 1e-3)
    assert learn.feature_cache.active

def test_no_attribute_shadowing_on_torchvision_features():
    "torchvision ConvNeXt/EfficientNet have `model.features`: the cache's attribute must not shadow `learn.features`."
    dls = task_dls(ArrayData(torch.rand(8, 3, 32, 32), torch.arange(8) % 2, torch.rand(4, 3, 32, 32), torch.arange(4) % 2,
                             ['a', 'b'], 'synthetic'), bs=4, normalize=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn = _fit(transfer_learner(torchvision.models.efficientnet_b0(weights=None), dls, n_retrain=1), 1, 1e-3)
    assert not [x for x in w if 'shadowing' in str(x.message)], [str(x.message) for x in w]
    assert learn.feature_cache.active and learn.features is learn.model.features

@pytest.mark.parametrize('make', ['tv_convnext', 'tv_efficientnet'])
def test_hidden_head_on_structured_heads(make):
    "`hidden` on a head that is not a plain Linear: the head's last Linear becomes a `transfer_head` with hidden layers."
    from torchvision.models.convnext import CNBlockConfig
    m = (torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]) if make == 'tv_convnext'
         else torchvision.models.efficientnet_b0(weights=None))
    dls = task_dls(ArrayData(torch.rand(8, 3, 32, 32), torch.arange(8) % 3, torch.rand(4, 3, 32, 32), torch.arange(4) % 3,
                             ['a', 'b', 'c'], 'synthetic'), bs=4, normalize=False)
    learn = transfer_learner(m, dls, hidden=(16,), p_drop=0.2)
    lins = [x for x in head_module(learn.model).modules() if isinstance(x, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lins][-2:] == [(lins[-2].in_features, 16), (16, 3)]
    assert any(isinstance(x, torch.nn.Dropout) and x.p == 0.2 for x in head_module(learn.model).modules())
    _fit(learn, 1, 1e-3)
    assert learn.model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 3)

def test_hidden_head_refused_on_two_classifiers():
    timm = pytest.importorskip('timm')
    m = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, img_size=32)
    from rtl_fastai.callback.transfer import new_head
    with pytest.raises(TypeError, match=r'new_head: `hidden`=\(8,\) \(and `p_drop`\) need a head ending in an nn.Linear'):
        new_head(m, 3, hidden=(8,))


def _in_opt(learn, p): return any(p is q for pg in learn.opt.param_lists for q in pg)

@pytest.mark.parametrize('between', ['nothing', 'reset_opt', 'export', 'load_learner'])
def test_freeze_leaves_with_the_callback(digits, tmp_path, between):
    "`FreezeBlocks` in the learner, then taken out: the stem trains again, in the optimizer, with fastai's state for it "
    "(`do_wd`, `force_train`), whether fastai made a new optimizer meanwhile or the learner went through a pickle"
    from fastai.learner import load_learner
    _, dls = digits
    learn = Learner(dls, SmallCNN(widths=(8, 16), n_out=5), cbs=FreezeBlocks(2))
    bn = learn.model.stem.bn.weight
    _fit(learn)
    if between == 'reset_opt': _fit(learn, reset_opt=True)
    if between in ('export', 'load_learner'):
        learn.export(tmp_path/'e.pkl')
        if between == 'load_learner':
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                learn = load_learner(tmp_path/'e.pkl')
            learn.dls, bn = dls, learn.model.stem.bn.weight
            _fit(learn)   # the optimizer is made again, and the loaded callback freezes anew
    learn.remove_cb(learn.freeze_blocks)
    w = learn.model.stem.conv.weight
    assert w.requires_grad and _in_opt(learn, w) and learn.opt.state[bn].get('do_wd') is False
    w0 = w.detach().clone()
    _fit(learn)
    assert not torch.equal(w0, learn.model.stem.conv.weight)

def test_cache_off_line_under_the_progress_bar_and_csv_logger(shapes_folder, capsys, tmp_path):
    "Under fastai's progress bar (whose logger writes table rows) the reason is one line, not a row of characters; "
    "CSVLogger's file gets no such row"
    from fastai.vision.augment import Resize
    from fastai.callback.progress import CSVLogger
    learn = transfer_learner(SmallCNN(n_in=3, n_out=4, widths=(8, 16, 32)), _folder_dls(shapes_folder, Resize(40)),
                             n_retrain=1)
    learn.fit(1, 1e-3, cbs=CSVLogger(fname=tmp_path/'h.csv'))
    out = capsys.readouterr().out
    said = [l for l in out.splitlines() if 'FeatureCache off' in l]
    assert len(said) == 1 and "randomly augmented (Resize(method='crop'))" in said[0], out
    assert 'FeatureCache' not in (tmp_path/'h.csv').read_text() and 'F,e,a' not in (tmp_path/'h.csv').read_text()
    learn = transfer_learner(SmallCNN(n_in=3, n_out=4, widths=(8, 16, 32)), learn.dls, n_retrain=1)
    with learn.no_bar():   # a new learner: after a fit with both, fastai leaves the bar's logger in place
        learn.fit(1, 1e-3, cbs=CSVLogger(fname=tmp_path/'h2.csv'))
    out = capsys.readouterr().out
    assert len([l for l in out.splitlines() if l.startswith("FeatureCache off")]) == 1, repr(out)
    assert 'FeatureCache' not in (tmp_path/'h2.csv').read_text()


def test_transfer_learner_forward_check_takes_every_input():
    "The forward check at construction gives a model of two inputs both (it used to train, and still does)"
    from torch.utils.data import TensorDataset, DataLoader as TDL
    from fastai.data.core import DataLoaders
    class TwoInputs(SmallCNN):
        def forward(self, x, meta): return super().forward(x) + 0*meta.sum()
    x, m, y = torch.rand(32, 1, 8, 8), torch.rand(32, 3), torch.arange(32) % 10
    dl = TDL(TensorDataset(x, m, y), batch_size=16)
    dls = DataLoaders(dl, dl); dls.n_inp = 2
    learn = transfer_learner(TwoInputs(n_in=1, n_out=10, widths=(8,)), dls, n_out=10, cache=False,
                             loss_func=torch.nn.CrossEntropyLoss())
    w0 = head_module(learn.model).weight.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert not torch.equal(w0, head_module(learn.model).weight) and len(learn.recorder.values) == 1


def test_cache_keeps_channels_last(digits_dls):
    "A channels-last model's cached feature maps are stored channels-last (the retrained convolutions' layout: not "
    "converted again at every batch); the training is the same as without the cache"
    m = SmallCNN(n_in=1, n_out=digits_dls.c, widths=(8, 16)).to(memory_format=torch.channels_last)
    learn = transfer_learner(m, digits_dls, n_retrain=1, cache=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    c = learn.feature_cache.cached
    assert learn.feature_cache.active and c.ndim == 4 and c.shape[1] > 1
    assert c.is_contiguous(memory_format=torch.channels_last)


def test_cache_rebuilt_when_transforms_change(digits_dls):
    "`dls.add_tfms` between two fits (a `Normalize` added later, as fastai allows) changes the frozen features: the "
    "cache is built again, not reused stale"
    from fastai.data.transforms import Normalize
    dls = task_dls(bs=64, normalize=False)
    learn = transfer_learner(SmallCNN(n_in=1, n_out=dls.c, widths=(8, 16)), dls, n_retrain=1, cache=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    first = learn.feature_cache.cached.clone()
    dls.add_tfms([Normalize.from_stats(0.3, 0.37, cuda=False)], 'after_batch')
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert learn.feature_cache.active and not torch.allclose(first, learn.feature_cache.cached)


def _flipped(d):
    return ArrayData(d.x_train.flip(-1), d.y_train, d.x_valid.flip(-1), d.y_valid, d.classes, 'flipped')

def test_cache_rebuilt_for_new_training_data_of_the_same_size():
    "New DataLoaders (same size, same labels, other images) given to the learner: features rebuilt, not reused stale"
    set_seed(0)
    d = select_classes(load_digits_data(), list('56789'))
    src = SmallCNN(n_in=1, n_out=5, widths=(8, 16))
    a, b = task_dls(d, bs=64, normalize=False, seed=0), task_dls(_flipped(d), bs=64, normalize=False, seed=0)
    learn = transfer_learner(src, a, n_retrain=1, cache=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    first = learn.feature_cache.cached.clone()
    learn.dls = b
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.feature_cache.active
    assert not torch.allclose(first, learn.feature_cache.cached)   # the flipped images' features, not the old ones


def test_cache_trains_as_without_on_1x1_maps():
    ("Cached feature maps of 1x1 (contiguous both ways) keep the default layout the model gives them without the "
     "cache: the same training, bit for bit (they were stored channels-last, and the retrained block's gradients moved)")
    torch.manual_seed(0)
    src, res = SmallCNN(n_in=1, n_out=5, widths=(8, 16, 32, 64)).eval(), {}
    for cache in (True, False):
        set_seed(0, reproducible=True)
        learn = transfer_learner(src, task_dls('digits', classes='target', bs=64, seed=0), n_retrain=1, cache=cache)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
        if cache: assert learn.feature_cache.cached.shape[2:] == (1, 1) and learn.feature_cache.cached.is_contiguous()
        res[cache] = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    for n, p in res[True].items(): assert torch.equal(p, res[False][n]), n
