"Robust checkpoint loading: every supported layout, weights_only refusal, key/shape errors, URLs (on local files)."
import shutil, warnings, pickle
from pathlib import Path
from collections import OrderedDict
import pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from torch.utils.data import TensorDataset
from fastai.losses import CrossEntropyLossFlat
import rtl_fastai.checkpoint as ck
from rtl_fastai.checkpoint import load_robust_checkpoint, CheckpointMismatchError, UnsafeCheckpointError, extract_state_dict
from rtl_fastai.models import SmallCNN, PreActResNet18

torch.manual_seed(0)

def _src(): return PreActResNet18(n_out=6, width=4)

def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa: assert torch.equal(sa[k], sb[k]), k

@pytest.fixture
def src(): return _src()

def test_plain_state_dict(tmp_path, src):
    torch.save(src.state_dict(), tmp_path/'p.pt')
    _same(load_robust_checkpoint(_src(), tmp_path/'p.pt'), src)
    _same(load_robust_checkpoint(_src(), str(tmp_path/'p.pt')), src)

@pytest.mark.parametrize('with_opt', [True, False])
def test_fastai_learn_save(tmp_path, src, with_opt):
    ds = TensorDataset(torch.rand(4, 3, 32, 32), torch.randint(0, 6, (4,)))
    learn = Learner(DataLoaders.from_dsets(ds, ds, bs=2, device='cpu'), src, loss_func=CrossEntropyLossFlat(), path=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, 1e-3)  # optimizer state with moments and fastai's L of hypers
    f = learn.save('src', with_opt=with_opt)
    if with_opt: assert set(torch.load(f, weights_only=False)) == {'model', 'opt'}
    _same(load_robust_checkpoint(_src(), f), src)

def _madry_sd(model, mean, std):
    sd = OrderedDict()
    for pre in ('module.normalizer.', 'module.attacker.normalize.'):
        sd[pre+'new_mean'], sd[pre+'new_std'] = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for pre in ('module.model.', 'module.attacker.model.'):
        sd.update({pre+k: v.clone() for k, v in model.state_dict().items()})
    return sd

@pytest.mark.parametrize('entry', ['model', 'state_dict'])
def test_madrylab_checkpoint(tmp_path, src, entry):
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    torch.save({entry: _madry_sd(src, mean, std), 'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1}]},
                'schedule': None, 'epoch': 150}, tmp_path/'madry.pt')
    # into a model that normalizes inside: weights and normalizer both loaded
    m = load_robust_checkpoint(PreActResNet18(n_out=6, width=4, stats=([0.]*3, [1.]*3)), tmp_path/'madry.pt')
    x = torch.rand(2, 3, 32, 32)
    src.eval(); m.eval()
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), src((x - mean_t)/std_t))
    # into a model without normalization: weights loaded, and a warning gives the statistics to use
    with pytest.warns(UserWarning, match='NormalizeInput'):
        m2 = load_robust_checkpoint(_src(), tmp_path/'madry.pt')
    _same(m2, src)
    _, stats = extract_state_dict(torch.load(tmp_path/'madry.pt', weights_only=True))
    torch.testing.assert_close(stats[1].flatten(), torch.tensor(std))

def test_madrylab_checkpoint_with_numpy_scalars(tmp_path, src):
    "Training checkpoints often hold numpy scalars (metrics): allowed, as fastai's Learner.load allows them"
    import numpy as np
    torch.save({'model': _madry_sd(src, [.5]*3, [.25]*3), 'prec1': np.float64(51.2), 'epoch': 3}, tmp_path/'m.pt')
    with pytest.warns(UserWarning): _same(load_robust_checkpoint(_src(), tmp_path/'m.pt'), src)

def test_numpy_without_dtypes(monkeypatch):
    "numpy 1.x before 1.25 (no `np.dtypes`, scalars in `np.core`): the loader's allowlist is still built"
    import sys, types, numpy as np
    scalar = object()
    old = types.SimpleNamespace(__version__='1.24.4', lib=np.lib, dtype=np.dtype,
                                core=types.SimpleNamespace(multiarray=types.SimpleNamespace(scalar=scalar)))
    monkeypatch.setitem(sys.modules, 'numpy', old)
    short = ck._safe_globals()
    assert len(short) == 5 and short[1] is scalar and short[4] is np.dtype   # (and its two names, numpy 1's and 2's)

def test_numpy_scalars_of_the_other_numpy(tmp_path, src):
    "A file written under numpy 1 names its scalars `numpy.core.multiarray.scalar`, under numpy 2 "
    "`numpy._core.multiarray.scalar`: both load (a fastai 2.7 `learn.save(with_opt=True)`, an old MadryLab file)"
    import numpy as np
    torch.save({'model': _madry_sd(src, [.5]*3, [.25]*3), 'prec1': np.float64(51.2), 'epoch': np.int64(3)},
               tmp_path/'m.pt', _use_new_zipfile_serialization=False)   # the old format: the pickle as bytes
    raw = (tmp_path/'m.pt').read_bytes()
    for now, other in (('numpy._core.multiarray', 'numpy.core.multiarray'), ('numpy.core.multiarray', 'numpy._core.multiarray')):
        if f'c{now}\nscalar\n'.encode() not in raw: continue
        (tmp_path/'o.pt').write_bytes(raw.replace(f'c{now}\nscalar\n'.encode(), f'c{other}\nscalar\n'.encode()))
        with pytest.warns(UserWarning): _same(load_robust_checkpoint(_src(), tmp_path/'o.pt'), src)
        ck_ = ck._safe_load(tmp_path/'o.pt')
        assert ck_['prec1'] == 51.2 and ck_['epoch'] == 3
        break
    else: raise AssertionError('no numpy scalar global in the file')

def test_torch_without_safe_globals(tmp_path, src, monkeypatch):
    "torch < 2.5 (no `safe_globals`): plain weights load; a file with numpy scalars is refused, never unpickled freely"
    import numpy as np
    monkeypatch.delattr(torch.serialization, 'safe_globals')
    torch.save(src.state_dict(), tmp_path/'p.pt')
    _same(load_robust_checkpoint(_src(), tmp_path/'p.pt'), src)
    torch.save({'model': src.state_dict(), 'prec1': np.float64(51.2)}, tmp_path/'n.pt')
    with pytest.raises(UnsafeCheckpointError, match='weights_only=True'): load_robust_checkpoint(_src(), tmp_path/'n.pt')

@pytest.mark.parametrize('wrap', [False, True])
def test_robustbench_style(tmp_path, src, wrap):
    "RobustBench zoo files: a (DataParallel 'module.'-prefixed) state dict, optionally under 'state_dict'"
    sd = OrderedDict(('module.'+k, v) for k, v in src.state_dict().items())
    torch.save({'state_dict': sd} if wrap else sd, tmp_path/'rb.pt')
    _same(load_robust_checkpoint(_src(), tmp_path/'rb.pt'), src)

def test_explicit_key(tmp_path, src):
    torch.save({'ema': src.state_dict(), 'model': SmallCNN().state_dict()}, tmp_path/'k.pt')
    _same(load_robust_checkpoint(_src(), tmp_path/'k.pt', key='ema'), src)
    with pytest.raises(KeyError, match='`key`'): load_robust_checkpoint(_src(), tmp_path/'k.pt', key='nope')

def test_missing_unexpected_and_shape_errors_name_the_keys(tmp_path, src):
    sd = src.state_dict()
    bad = OrderedDict((k, v) for k, v in sd.items() if k != 'head.bias')
    bad['extra.weight'] = torch.zeros(3)
    bad['head.weight'] = torch.zeros(10, sd['head.weight'].shape[1])
    torch.save(bad, tmp_path/'bad.pt')
    m = _src(); before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e: load_robust_checkpoint(m, tmp_path/'bad.pt')
    msg = str(e.value)
    assert 'missing in the checkpoint (1): head.bias' in msg
    assert 'unexpected in the checkpoint (1): extra.weight' in msg
    assert f"head.weight: checkpoint (10, {sd['head.weight'].shape[1]}) vs model (6, {sd['head.weight'].shape[1]})" in msg
    for k, v in m.state_dict().items(): assert torch.equal(v, before[k]), 'nothing may be loaded on error'

def test_wrong_architecture_lists_many_keys(tmp_path, src):
    torch.save(src.state_dict(), tmp_path/'p.pt')
    with pytest.raises(CheckpointMismatchError, match=r'wrong shape \(\d+\)'):
        load_robust_checkpoint(PreActResNet18(n_out=6, width=8), tmp_path/'p.pt')
    with pytest.raises(CheckpointMismatchError, match='more'):
        load_robust_checkpoint(SmallCNN(n_in=3, n_out=6), tmp_path/'p.pt')

def test_old_checkpoint_without_num_batches_tracked(tmp_path, src):
    sd = OrderedDict((k, v) for k, v in src.state_dict().items() if not k.endswith('num_batches_tracked'))
    torch.save(sd, tmp_path/'old.pt')
    m = load_robust_checkpoint(_src(), tmp_path/'old.pt')
    for k, v in sd.items(): assert torch.equal(m.state_dict()[k], v)

class _Custom:  # a class whose unpickling would need this module's code
    def __init__(self): self.w = torch.ones(2)

@pytest.mark.parametrize('obj', ['module', 'custom'])
def test_unpickling_code_is_refused(tmp_path, src, obj):
    torch.save(src if obj == 'module' else {'model': _Custom()}, tmp_path/'u.pt')
    with pytest.raises(UnsafeCheckpointError) as e: load_robust_checkpoint(_src(), tmp_path/'u.pt')
    msg = str(e.value)
    assert 'torch.load(weights_only=True) refused' in msg and 'arbitrary code' in msg and 'state_dict()' in msg
    assert isinstance(e.value, pickle.UnpicklingError)

def test_fastai_export_is_named(tmp_path, src):
    "A `learn.export()` file (what `rtl-fastai transfer` writes) as a checkpoint: refused, and the message says what it "
    "is and what works (`load_learner`, or its model's state dict); the generic advice would index the Learner"
    from fastai.learner import Learner
    from rtl_fastai.data.all import task_dls
    Learner(task_dls(bs=8), _src()).export(tmp_path/'export.pkl')
    with pytest.raises(UnsafeCheckpointError) as e: load_robust_checkpoint(_src(), tmp_path/'export.pkl')
    msg = str(e.value)
    assert 'learn.export()' in msg and 'load_learner(path)' in msg and '.model.state_dict()' in msg

def test_url_download_is_cached(tmp_path, src, monkeypatch):
    torch.save(src.state_dict(), tmp_path/'w.pt')
    calls = []
    def fake(url, dest): calls.append((url, dest)); shutil.copy(tmp_path/'w.pt', dest)
    monkeypatch.setattr(ck, '_download', fake)
    url = 'https://example.org/robust/cifar_linf_8.pt'
    for _ in range(2): _same(load_robust_checkpoint(_src(), url, model_dir=tmp_path/'cache'), src)
    assert len(calls) == 1 and calls[0][0] == url and str(calls[0][1]).endswith('-cifar_linf_8.pt')
    # another URL with the same file name does not overwrite the first download
    other = 'https://example.com/other/cifar_linf_8.pt'
    load_robust_checkpoint(_src(), other, model_dir=tmp_path/'cache')
    assert len(list((tmp_path/'cache').iterdir())) == 2

def test_url_default_cache_uses_rtl_cache(tmp_path, src, monkeypatch):
    torch.save(src.state_dict(), tmp_path/'w.pt')
    monkeypatch.setenv('RTL_CACHE', str(tmp_path/'rc'))
    monkeypatch.setattr(ck, '_download', lambda url, dest: shutil.copy(tmp_path/'w.pt', dest))
    load_robust_checkpoint(_src(), 'http://example.org/w.pt')
    assert len(list((tmp_path/'rc'/'checkpoints').iterdir())) == 1

def test_download_helper_is_torch_hub(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda url, dst, progress=True: seen.append((url, dst)))
    ck._download('https://x/y.pt', tmp_path/'y.pt')
    assert seen == [('https://x/y.pt', str(tmp_path/'y.pt'))]

def test_file_url_and_bad_paths(tmp_path, src):
    torch.save(src.state_dict(), tmp_path/'w.pt')
    _same(load_robust_checkpoint(_src(), (tmp_path/'w.pt').as_uri()), src)
    with pytest.raises(FileNotFoundError, match='no checkpoint file'): load_robust_checkpoint(_src(), tmp_path/'none.pt')
    with pytest.raises(ValueError, match='unsupported URL scheme'): load_robust_checkpoint(_src(), 'gs://b/w.pt')
    torch.save({'epoch': 3, 'acc': 0.5}, tmp_path/'noweights.pt')
    with pytest.raises(ValueError, match='`key=`'): load_robust_checkpoint(_src(), tmp_path/'noweights.pt')


# ---------------------------------------------------------------------------------------------------------------
# issue 12: every layout users meet, built from a seeded torchvision model in the exact key layout; the loaded
# model gives logits identical to the original on correctly normalized input
import torchvision, timm
from rtl_fastai.core import input_stats, check_normalization, add_input_norm
from rtl_fastai.checkpoint import load_weights
from rtl_fastai.hub import RobustModelInfo, ROBUST_MODELS, IMAGENET_STATS

IM_MEAN, IM_STD = torch.tensor(IMAGENET_STATS[0]).view(1, 3, 1, 1), torch.tensor(IMAGENET_STATS[1]).view(1, 3, 1, 1)

def _tv(seed=1, n=5):
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=n)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, so that buffers matter too
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d): mod.running_mean.uniform_(-.1, .1); mod.running_var.uniform_(.5, 1.5)
    return m.eval()

def _x(): return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))

def _norm(x): return (x - IM_MEAN) / IM_STD

class ImageNormalizer(nn.Module):  # RobustBench's normalization layer: persistent (1,3,1,1) buffers
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.as_tensor(mean).view(1, 3, 1, 1))
        self.register_buffer('std', torch.as_tensor(std).view(1, 3, 1, 1))
    def forward(self, x): return (x - self.mean) / self.std

def _rb_model(net): return nn.Sequential(OrderedDict([('normalize', ImageNormalizer(*IMAGENET_STATS)), ('model', net)]))

def _madry_ckpt(net):
    "MadryLab robustness `AttackerModel` wrapped in DataParallel, as `robustness.train` saves it"
    sd = OrderedDict()
    mean, std = torch.tensor(IMAGENET_STATS[0]).view(3, 1, 1), torch.tensor(IMAGENET_STATS[1]).view(3, 1, 1)
    sd['module.normalizer.new_mean'], sd['module.normalizer.new_std'] = mean.clone(), std.clone()
    sd.update({'module.model.'+k: v.clone() for k, v in net.state_dict().items()})
    sd['module.attacker.normalize.new_mean'], sd['module.attacker.normalize.new_std'] = mean.clone(), std.clone()
    sd.update({'module.attacker.model.'+k: v.clone() for k, v in net.state_dict().items()})
    return {'model': sd, 'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1, 'params': [0, 1]}]},
            'schedule': {'milestones': [30, 60], 'last_epoch': 89}, 'epoch': 90}

def _dp_sd(m): return OrderedDict(('module.'+k, v) for k, v in m.state_dict().items())  # what DataParallel(m).state_dict() holds

def test_dataparallel_prefix_is_real():
    net = _tv(); assert list(nn.DataParallel(net).state_dict()) == list(_dp_sd(net))

LAYOUTS = {  # name: (what is saved, whether the file holds the normalization)
    'madrylab':            (lambda n: _madry_ckpt(n), True),
    'madrylab-state_dict': (lambda n: {'state_dict': _madry_ckpt(n)['model'], 'epoch': 3}, True),
    'robustbench':         (lambda n: _rb_model(n).state_dict(), True),
    'robustbench-sd':      (lambda n: {'state_dict': _rb_model(n).state_dict()}, True),
    'robustbench-module':  (lambda n: _dp_sd(_rb_model(n)), True),
    'robustbench-sd-module': (lambda n: {'state_dict': _dp_sd(_rb_model(n))}, True),
    'robustbench-zoo':     (lambda n: {'state_dict': _dp_sd(n)}, False),  # RobustBench's ImageNet files: no stats
    'dataparallel':        (lambda n: _dp_sd(n), False),
    'plain':               (lambda n: n.state_dict(), False),
    'model-prefix':        (lambda n: OrderedDict(('model.'+k, v) for k, v in n.state_dict().items()), False),
}

@pytest.mark.parametrize('layout', list(LAYOUTS))
@pytest.mark.parametrize('norm', ['model', 'dls'])
def test_layouts_give_identical_logits(tmp_path, layout, norm):
    net, x = _tv(), _x()
    make, has_stats = LAYOUTS[layout]
    torch.save(make(net), tmp_path/'c.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # an explicit `normalize` loads without a warning
        m = load_robust_checkpoint(torchvision.models.resnet18(num_classes=5), tmp_path/'c.pt', normalize=norm,
                                   stats=None if has_stats else IMAGENET_STATS).eval()
    _same_sd = lambda a, b: [torch.equal(a.state_dict()[k], v) or k for k, v in b.state_dict().items()]
    assert all(r is True for r in _same_sd(m, net))
    mean, std = input_stats(m)
    assert torch.equal(mean, IM_MEAN) and torch.equal(std, IM_STD)
    with torch.no_grad():
        if norm == 'model': assert torch.equal(m(x), net(_norm(x)))          # the model takes [0,1] pixels
        else:
            assert 'input_stats' in vars(m)
            assert torch.equal(m(_norm(x)), net(_norm(x)))                    # the DataLoaders normalize

def test_robustbench_model_logits_match_normalize_model(tmp_path):
    "The RobustBench model itself (normalization inside) and the loaded torchvision model agree on raw pixels"
    net, x = _tv(), _x()
    rb = _rb_model(net).eval()
    torch.save({'state_dict': _dp_sd(rb)}, tmp_path/'rb.pt')
    m = load_robust_checkpoint(torchvision.models.resnet18(num_classes=5), tmp_path/'rb.pt', normalize='model').eval()
    with torch.no_grad(): assert torch.equal(m(x), rb(x))

def test_robustbench_without_norm_warns_with_working_advice(tmp_path):
    torch.save(_rb_model(_tv()).state_dict(), tmp_path/'rb.pt')
    with pytest.warns(UserWarning) as w: m = load_robust_checkpoint(torchvision.models.resnet18(num_classes=5), tmp_path/'rb.pt')
    msg = str(w[0].message)
    assert 'Normalize.from_stats(*input_stats(model))' in msg and "normalize='model'" in msg and 'stats=(mean' not in msg
    assert torch.equal(input_stats(m)[0], IM_MEAN)

def test_fastai_learner_save_torchvision(tmp_path):
    net, x = _tv(), _x()
    ds = TensorDataset(torch.rand(4, 3, 32, 32), torch.randint(0, 5, (4,)))
    learn = Learner(DataLoaders.from_dsets(ds, ds, bs=2, device='cpu'), net, loss_func=CrossEntropyLossFlat(), path=tmp_path)
    learn.create_opt()
    f = learn.save('tv', with_opt=True)
    m = load_robust_checkpoint(torchvision.models.resnet18(num_classes=5), f).eval()
    with torch.no_grad(): assert torch.equal(m(x), net.eval()(x))
    assert input_stats(m) is None  # a fastai file holds no statistics: none are invented

def test_safetensors_timm_keys(tmp_path):
    "A timm resnet18 saved as safetensors (timm/Hugging Face hub files) loads into torchvision's resnet18"
    from safetensors.torch import save_file
    torch.manual_seed(4)
    tm = timm.create_model('resnet18', num_classes=5).eval()
    save_file(tm.state_dict(), str(tmp_path/'model.safetensors'))
    x = _x()
    m = load_robust_checkpoint(torchvision.models.resnet18(num_classes=5), tmp_path/'model.safetensors',
                               normalize='model', stats=IMAGENET_STATS).eval()
    with torch.no_grad(): assert torch.equal(m(x), tm(_norm(x)))
    # recognized by its header under any name, and back into timm's model
    shutil.copy(tmp_path/'model.safetensors', tmp_path/'weights.bin')
    m2 = load_robust_checkpoint(timm.create_model('resnet18', num_classes=5), tmp_path/'weights.bin').eval()
    with torch.no_grad(): assert torch.equal(m2(x), tm(x))

def test_safetensors_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    save_file({'w': torch.ones(2)}, str(tmp_path/'m.safetensors'))
    import builtins
    real = builtins.__import__
    def fake(name, *a, **k):
        if name.startswith('safetensors'): raise ImportError('no safetensors')
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, '__import__', fake)
    with pytest.raises(ImportError, match='pip install safetensors'): load_robust_checkpoint(nn.Linear(1, 2), tmp_path/'m.safetensors')

# -- the statistics and the DataLoaders
def _tdls(stats=None, c=3):
    from fastai.data.core import TfmdDL
    from fastai.data.transforms import Normalize
    tfms = [Normalize.from_stats(*stats, cuda=False)] if stats else []
    dl = TfmdDL([(torch.rand(c, 8, 8), 0)]*4, bs=2, after_batch=tfms)
    return DataLoaders(dl, dl)

def test_check_normalization_after_loading(tmp_path):
    torch.save(_madry_ckpt(_tv()), tmp_path/'m.ckpt')
    m = load_robust_checkpoint(torchvision.models.resnet18(num_classes=5), tmp_path/'m.ckpt', normalize='dls')
    assert check_normalization(m, _tdls(IMAGENET_STATS), 'transfer_learner') is None
    dls = _tdls()
    with pytest.warns(UserWarning, match=r'transfer_learner: .*expects inputs normalized with mean=\[0.485'):
        check_normalization(m, dls, 'transfer_learner')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once per model and DataLoaders
        assert 'do not normalize' in check_normalization(m, dls, 'transfer_learner')
    with pytest.warns(UserWarning, match='normalize with mean=\\[0.5'): check_normalization(m, _tdls(([.5]*3, [.5]*3)), 'RobustAccuracy')
    inside = load_robust_checkpoint(torchvision.models.resnet18(num_classes=5), tmp_path/'m.ckpt', normalize='model')
    assert check_normalization(inside, _tdls(), 'robust_validate') is None
    with pytest.warns(UserWarning, match='robust_validate: the inputs are normalized twice'):
        check_normalization(inside, _tdls(IMAGENET_STATS), 'robust_validate')

def test_add_input_norm_survives_copy_and_pickle(tmp_path):
    import copy
    net, x = _tv(), _x()
    m = add_input_norm(copy.deepcopy(net), IMAGENET_STATS)
    for m2 in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        with torch.no_grad(): assert torch.equal(m2(x), net(_norm(x)))
        assert torch.equal(input_stats(m2)[1], IM_STD)

def test_norm_dls_with_a_normalizing_model_is_refused(tmp_path, src):
    torch.save(_madry_sd(src, [.5]*3, [.25]*3), tmp_path/'m.pt')
    with pytest.raises(ValueError, match="`normalize`='dls'"):
        load_robust_checkpoint(PreActResNet18(n_out=6, width=4, stats=([0.]*3, [1.]*3)), tmp_path/'m.pt', normalize='dls')
    with pytest.raises(ValueError, match='`normalize` must be'): load_robust_checkpoint(_src(), tmp_path/'m.pt', normalize='inside')

def test_stats_channels_must_match_the_model(tmp_path):
    m1 = SmallCNN(n_in=1, n_out=5)
    torch.save(m1.state_dict(), tmp_path/'p.pt')
    before = {k: v.clone() for k, v in m1.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r'the input statistics \(`stats`\) have 3 channels .* takes 1-channel'):
        load_robust_checkpoint(m1, tmp_path/'p.pt', stats=IMAGENET_STATS, normalize='dls')
    for k, v in m1.state_dict().items(): assert torch.equal(v, before[k])

def test_load_weights_for_entry_points(tmp_path):
    net, x = _tv(), _x()
    torch.save(_madry_ckpt(net), tmp_path/'m.ckpt')
    for w in (tmp_path/'m.ckpt', str(tmp_path/'m.ckpt'), _madry_ckpt(net)):
        m = load_weights(torchvision.models.resnet18(num_classes=5), w, normalize='dls').eval()
        with torch.no_grad(): assert torch.equal(m(_norm(x)), net(_norm(x)))
    with pytest.raises(CheckpointMismatchError, match=r'transfer_learner: `weights`: the checkpoint does not match'):
        load_weights(torchvision.models.resnet34(num_classes=5), tmp_path/'m.ckpt')
    with pytest.raises(FileNotFoundError, match='`weights`: no checkpoint file'): load_weights(_tv(), tmp_path/'no.pt')

# -- the registry, end to end from a mocked download of a local file in the published layout
def _serve(monkeypatch, files, calls):
    def fake(url, dest):
        calls.append(url)
        f = files[url]
        if isinstance(f, Exception): raise f
        Path(dest).write_bytes(f.read_bytes() if isinstance(f, Path) else f)
    monkeypatch.setattr(ck, '_download', fake)

def test_registry_salman_end_to_end(tmp_path, monkeypatch):
    info = ROBUST_MODELS['resnet18_l2_eps3']
    assert info.url == 'https://huggingface.co/madrylab/robust-imagenet-models/resolve/main/resnet18_l2_eps3.ckpt'
    assert (info.arch, info.norm, info.eps, info.layout) == ('resnet18', 'L2', 3.0, 'madrylab')
    net, x = _tv(n=1000), _x()
    torch.save(_madry_ckpt(net), tmp_path/'resnet18_l2_eps3.ckpt')
    calls = []
    _serve(monkeypatch, {info.url: tmp_path/'resnet18_l2_eps3.ckpt'}, calls)
    for _ in range(2):
        m = load_robust_checkpoint('resnet18_l2_eps3', model_dir=tmp_path/'cache', normalize='model').eval()
        with torch.no_grad(): assert torch.equal(m(x), net(_norm(x)))
    assert calls == [info.url]
    assert [p.name.split('-', 1)[1] for p in (tmp_path/'cache').iterdir()] == ['resnet18_l2_eps3.ckpt']
    # by name into a model the user built
    m = load_robust_checkpoint(torchvision.models.resnet18(), 'resnet18_l2_eps3', model_dir=tmp_path/'cache', normalize='dls')
    assert torch.equal(input_stats(m)[0], IM_MEAN) and calls == [info.url]

def test_registry_robustbench_zoo_file_gets_registry_stats(tmp_path, monkeypatch):
    info = ROBUST_MODELS['Salman2020Do_R18']
    net, x = _tv(n=1000), _x()
    torch.save({'state_dict': _dp_sd(net)}, tmp_path/'zoo.pt')
    _serve(monkeypatch, {info.url: tmp_path/'zoo.pt'}, [])
    m = load_robust_checkpoint('Salman2020Do_R18', model_dir=tmp_path/'c', normalize='model').eval()
    with torch.no_grad(): assert torch.equal(m(x), net(_norm(x)))
    assert [p.name.split('-', 1)[1] for p in (tmp_path/'c').iterdir()] == ['Salman2020Do_R18.pt']

def _entry(**kw):
    base = dict(name='tiny', arch='resnet18', stats=IMAGENET_STATS, norm='Linf', eps=4/255, url='https://example.org/tiny.pt',
                layout='state_dict', citation='test', n_out=5)
    return RobustModelInfo(**{**base, **kw})

def test_registry_hash_checked_and_bad_downloads_leave_nothing(tmp_path, monkeypatch):
    net = _tv()
    torch.save(net.state_dict(), tmp_path/'tiny.pt')
    good = ck._sha256(tmp_path/'tiny.pt')
    cache = tmp_path/'cache'
    data = (tmp_path/'tiny.pt').read_bytes()
    cases = [(_entry(sha256='0'*16), data, ValueError, 'expected SHA-256'),
             (_entry(), data[:len(data)//2], ValueError, 'not a readable checkpoint'),
             (_entry(), b'<html>Google Drive - Virus scan warning</html>', ValueError, 'web page instead of the file'),
             (_entry(), ConnectionError('no route to host'), OSError, 'downloading https://example.org/tiny.pt failed')]
    for info, payload, exc, msg in cases:
        _serve(monkeypatch, {info.url: payload}, [])
        with pytest.raises(exc, match=msg): load_robust_checkpoint(info, model_dir=cache, normalize='dls')
        assert list(cache.iterdir()) == [], 'nothing half-written may stay in the cache'
    _serve(monkeypatch, {'https://example.org/tiny.pt': data}, [])
    m = load_robust_checkpoint(_entry(sha256=good[:12]), model_dir=cache, normalize='dls').eval()
    x = _x()
    with torch.no_grad(): assert torch.equal(m(_norm(x)), net(_norm(x)))

def test_unknown_names_list_close_ones():
    with pytest.raises(ValueError, match=r"unknown robust model 'resnet50_l2_eps4'; did you mean 'resnet50_l2_eps5'"):
        load_robust_checkpoint('resnet50_l2_eps4')
    with pytest.raises(ValueError, match=r"`path_or_url`: 'Salman2020Do_R1' is neither a checkpoint file nor a registered model. did you mean 'Salman2020Do_R18'"):
        load_robust_checkpoint(torchvision.models.resnet18(), 'Salman2020Do_R1')
    # the CLI's `--arch resnet18` in Python, with a file: `model` must be the module (said with the call that works)
    with pytest.raises(ValueError, match=r"with a checkpoint given, `model` is the module to load it into: "
                                         r"`load_robust_checkpoint\(torchvision.models.resnet18\(num_classes=...\), 'my.ckpt'\)`"):
        load_robust_checkpoint('resnet18', 'my.ckpt')

def test_registry_wrong_architecture_is_a_mismatch(tmp_path, monkeypatch):
    info = ROBUST_MODELS['resnet18_linf_eps4.0']
    torch.save(_madry_ckpt(_tv(n=1000)), tmp_path/'f.ckpt')
    _serve(monkeypatch, {info.url: tmp_path/'f.ckpt'}, [])
    with pytest.raises(CheckpointMismatchError, match='does not match the model'):
        load_robust_checkpoint(torchvision.models.resnet34(), 'resnet18_linf_eps4.0', model_dir=tmp_path/'c')


def test_registry_file_given_first_and_offline_message(tmp_path, monkeypatch):
    "A file named as a registry entry may come first; any other file gets the two forms that work; offline, the registry download failure names them"
    import urllib.error
    import rtl_fastai.checkpoint as ck
    from rtl_fastai.hub import robust_model_info
    m = robust_model_info('resnet18_linf_eps4.0').build()
    torch.manual_seed(0)
    for p_ in m.parameters(): p_.data.normal_()
    f = tmp_path/'resnet18_linf_eps4.0.ckpt'
    torch.save(m.state_dict(), f)
    got = ck.load_robust_checkpoint(str(f))
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), m.state_dict().values()))
    other = tmp_path/'weights.pt'
    torch.save(m.state_dict(), other)
    with pytest.raises(ValueError, match="is a checkpoint file, not an architecture.*load_robust_checkpoint\\(model"):
        ck.load_robust_checkpoint(str(other))
    def offline(url, dest): raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(ck, '_download', offline)
    with pytest.raises(OSError, match=r"'resnet18_linf_eps4.0' is not in the cache.*Offline\? Fetch .*--source path/to/resnet18_linf_eps4.0.ckpt"):
        ck.load_robust_checkpoint('resnet18_linf_eps4.0', model_dir=tmp_path/'c')


def test_truncated_small_checkpoint_is_named(tmp_path):
    "A small zip checkpoint cut in half: torch raises OSError(EINVAL); the message names the file and says to re-save"
    torch.save(SmallCNN(1, 10, widths=(16, 32)).state_dict(), tmp_path/'s.pth')
    b = (tmp_path/'s.pth').read_bytes()
    (tmp_path/'t.pth').write_bytes(b[:len(b)//2])
    with pytest.raises(ValueError, match=r"t\.pth is not a readable torch checkpoint"):
        load_robust_checkpoint(SmallCNN(1, 10, widths=(16, 32)), tmp_path/'t.pth')


def test_truncated_old_format_checkpoint_is_named(tmp_path, monkeypatch):
    "The old (pre-zip) format, cut anywhere (a half-finished download of a 2019-2020 MadryLab file): a ValueError naming "
    "the file, never a bare IndexError/struct.error; a truncated download is not kept, and is not called unsafe"
    import numpy as np
    net = SmallCNN(1, 10, widths=(8,))
    torch.save({'model': net.state_dict(), 'epoch': np.int64(3)}, tmp_path/'old.pt', _use_new_zipfile_serialization=False)
    b = (tmp_path/'old.pt').read_bytes()
    kinds = set()
    for cut in range(1, len(b), max(1, len(b)//300)):
        (tmp_path/'t.pt').write_bytes(b[:cut])
        try: ck._safe_load(tmp_path/'t.pt')
        except ValueError as e: kinds.add('ValueError'); assert 't.pt is not a readable torch checkpoint' in str(e)
        except UnsafeCheckpointError: kinds.add('unsafe')   # a cut inside a global's name: refused, never unpickled
    assert 'ValueError' in kinds
    monkeypatch.setattr(ck, '_download', lambda url, dest: Path(dest).write_bytes(b[:len(b)//2]))
    with pytest.raises(ValueError, match='is not a readable checkpoint .an interrupted download'):
        ck.checkpoint_path('https://example.org/old.pt', model_dir=tmp_path/'c')
    assert not any((tmp_path/'c').iterdir())
    for cut in range(1, 200):   # cuts early in the pickle, where a global's name can be cut
        monkeypatch.setattr(ck, '_download', lambda url, dest: Path(dest).write_bytes(b[:cut]))
        with pytest.raises(ValueError, match='not a readable checkpoint'):
            ck.checkpoint_path(f'https://example.org/{cut}.pt', model_dir=tmp_path/'c')


def test_cache_and_file_urls(tmp_path, monkeypatch):
    "`cache='~/...'` is under the home folder; a `cache` that is a file, and a relative file:// URL, are named"
    monkeypatch.setenv('HOME', str(tmp_path/'home'))
    monkeypatch.chdir(tmp_path)
    torch.save(SmallCNN(1, 10, widths=(8,)).state_dict(), tmp_path/'w.pt')
    monkeypatch.setattr(ck, '_download', lambda url, dest: shutil.copy(tmp_path/'w.pt', dest))
    p = ck.checkpoint_path('https://example.org/w.pt', model_dir='~/ckpts')
    assert p.parent == tmp_path/'home'/'ckpts' and not (tmp_path/'~').exists()
    (tmp_path/'afile').write_text('x')
    with pytest.raises(NotADirectoryError, match=r"`model_dir`=.*afile.* is a file"):
        ck.checkpoint_path('https://example.org/w.pt', model_dir=tmp_path/'afile')
    with pytest.raises(ValueError, match='file:// URL takes an absolute path'): ck.checkpoint_path('file://w.pt')
    assert ck.checkpoint_path(f'file://{tmp_path}/w.pt') == tmp_path/'w.pt'


def test_whole_model_checkpoint_into_a_vision_learner_model(tmp_path):
    "A torchvision ResNet checkpoint (MadryLab layout) into fastai's `vision_learner` model: its cut body gets the "
    "weights, its own head stays; `transfer_learner(learner, dls, weights=...)` takes the same route"
    import torchvision
    from fastai.vision.learner import vision_learner
    from fastai.vision.models import resnet18 as fa_resnet18
    src = torchvision.models.resnet18(weights=None)
    torch.save({'model': {**{f'module.model.{k}': v for k, v in src.state_dict().items()},
                          **{f'module.attacker.model.{k}': v for k, v in src.state_dict().items()}}},
               tmp_path/'madry.ckpt')
    ds = TensorDataset(torch.rand(8, 3, 32, 32), torch.arange(8) % 3)
    dls = DataLoaders.from_dsets(ds, ds, bs=4)
    m = vision_learner(dls, fa_resnet18, pretrained=False, n_out=3, normalize=False, loss_func=CrossEntropyLossFlat()).model
    head = {k: v.clone() for k, v in m[1].state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        load_robust_checkpoint(m, tmp_path/'madry.ckpt', normalize='dls', stats=([0.5]*3, [0.25]*3))
    assert torch.equal(m[0][0].weight, src.conv1.weight) and torch.equal(m[0][7][1].bn2.running_var, src.layer4[1].bn2.running_var)
    assert all(torch.equal(v, m[1].state_dict()[k]) for k, v in head.items())
    m[0][0].weight.data.zero_()   # the keys in another order (sorted, as safetensors stores them): the same parts
    torch.save(dict(sorted(src.state_dict().items())), tmp_path/'sorted.pth')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        load_robust_checkpoint(m, tmp_path/'sorted.pth', normalize='dls', stats=([0.5]*3, [0.25]*3))
    assert torch.equal(m[0][0].weight, src.conv1.weight) and torch.equal(m[0][1].weight, src.bn1.weight)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path/'r50.pth')   # another architecture
    with pytest.raises(CheckpointMismatchError, match='does not match the model'):
        load_robust_checkpoint(m, tmp_path/'r50.pth', normalize='dls', stats=([0.5]*3, [0.25]*3))


def test_bad_cached_download_says_to_delete_it(tmp_path, monkeypatch):
    "A cached download that went bad (disk error, edited by hand) is never fetched again: the error says to delete it"
    torch.save(SmallCNN(1, 10, widths=(8,)).state_dict(), tmp_path/'w.pt')
    monkeypatch.setattr(ck, '_download', lambda url, dest: shutil.copy(tmp_path/'w.pt', dest))
    p = ck.checkpoint_path('https://example.org/w.pt', model_dir=tmp_path/'c')
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cached download of https://example.org/w.pt: delete .*w\.pt to download it again"):
        load_robust_checkpoint(SmallCNN(1, 10, widths=(8,)), 'https://example.org/w.pt', model_dir=tmp_path/'c')


def test_old_keyword_names_still_work(tmp_path, src):
    "`norm=` and `cache=` (the names before `normalize=` and `model_dir=`) load the same, with a FutureWarning"
    torch.save(_madry_sd(src, [.5]*3, [.25]*3), tmp_path/'m.pt')
    new = load_robust_checkpoint(_src(), tmp_path/'m.pt', normalize='dls')
    with pytest.warns(FutureWarning, match="load_robust_checkpoint: `norm` is now called `normalize`"):
        old = load_robust_checkpoint(_src(), tmp_path/'m.pt', norm='dls')
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    assert torch.equal(input_stats(old)[1], input_stats(new)[1])
    with pytest.warns(FutureWarning, match="`cache` is now called `model_dir`"):
        assert ck.checkpoint_path(tmp_path/"m.pt", cache=tmp_path/"c") == tmp_path/"m.pt"
    with pytest.raises(TypeError, match='give `normalize` only'):
        load_robust_checkpoint(_src(), tmp_path/'m.pt', norm='dls', normalize='model')


class _Sub(nn.Module):
    "A model whose parameter names hold 'module.' and 'model.' inside them (a `submodule`, a `sub_model`)"
    def __init__(self):
        super().__init__()
        self.submodule = nn.Linear(4, 3); self.sub_model = nn.Linear(3, 2)
    def forward(self, x): return self.sub_model(self.submodule(x))

def test_prefix_stripping_keeps_inner_substrings(tmp_path):
    "A DataParallel ('module.'-prefixed) checkpoint of a model with 'submodule'/'sub_model' layers loads exactly"
    torch.manual_seed(0)
    src = _Sub()
    torch.save(OrderedDict(('module.' + k, v) for k, v in src.state_dict().items()), tmp_path/'dp.pt')
    m = load_robust_checkpoint(_Sub(), tmp_path/'dp.pt')
    for k, v in src.state_dict().items(): assert torch.equal(m.state_dict()[k], v), k

def test_imagenet_checkpoint_without_stats_warns(tmp_path):
    "A 1000-class checkpoint that stores no input statistics, none given: a warning says how to give them (the CLI "
    "refuses such a file); with `stats`, or into a model that knows its statistics, nothing is said of it"
    torch.save(_tv(n=1000).state_dict(), tmp_path/'mine.pt')
    with pytest.warns(UserWarning, match=r"stores no input statistics.*stats=imagenet_stats") as w:
        m = load_robust_checkpoint(torchvision.models.resnet18(), tmp_path/'mine.pt')
    assert input_stats(m) is None and "load_robust_checkpoint: " in str(w[0].message)
    from rtl_fastai.checkpoint import load_weights
    with pytest.warns(UserWarning, match=r"transfer_learner: `weights`: the checkpoint stores no input statistics.*"
                                         r"record it on the model you give: `model.input_stats = imagenet_stats`"):
        load_weights(torchvision.models.resnet18(), tmp_path/'mine.pt')   # (what `transfer_learner(weights=)` calls)
    told = torchvision.models.resnet18(); told.input_stats = (IM_MEAN, IM_STD)   # the advice followed: nothing said
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); load_weights(told, tmp_path/'mine.pt')
    assert not [o for o in w if 'stores no input statistics' in str(o.message)]
    for kw in (dict(stats=([0.,0.,0.], [1.,1.,1.])), dict(stats=(IM_MEAN, IM_STD), normalize='dls')):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            m = load_robust_checkpoint(torchvision.models.resnet18(), tmp_path/'mine.pt', **kw)
        assert not [o for o in w if 'stores no input statistics' in str(o.message)] and input_stats(m) is not None
    known = torchvision.models.resnet18(); known.input_stats = (IM_MEAN, IM_STD)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); load_robust_checkpoint(known, tmp_path/'mine.pt')
    assert not [o for o in w if 'stores no input statistics' in str(o.message)]
    torch.save(_src().state_dict(), tmp_path/'small.pt')   # not an ImageNet classifier: its statistics are the user's
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); load_robust_checkpoint(_src(), tmp_path/'small.pt')
    assert not w

def test_registry_file_name_gives_its_stats(tmp_path):
    "A published file fetched by hand and loaded by path (RobustBench's zoo file stores no statistics): its registry "
    "file name gives the statistics, as on the command line"
    net = _tv(n=1000)
    torch.save({'state_dict': _dp_sd(net)}, tmp_path/'Salman2020Do_R18.pt')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        m = load_robust_checkpoint(torchvision.models.resnet18(), tmp_path/'Salman2020Do_R18.pt', normalize='model').eval()
    assert not [o for o in w if 'stores no input statistics' in str(o.message)]
    x = _x()
    with torch.no_grad(): assert torch.equal(m(x), net(_norm(x)))
    # RobustBench's CIFAR-10 files share some names with ImageNet entries (Wong2020Fast): not an ImageNet classifier,
    # so not taken for the registry's file (whose statistics would be ImageNet's)
    torch.save(_tv(n=10).state_dict(), tmp_path/'Wong2020Fast.pt')
    m = load_robust_checkpoint(torchvision.models.resnet18(num_classes=10), tmp_path/'Wong2020Fast.pt')
    assert input_stats(m) is None
