"""RobustBench models: the real classes of the `robustbench` package (scripts/test.sh installs robustbench 1.1.1
without its dependencies, as it does torchattacks), through `model_blocks`, `input_stats`, `transfer_learner`, the
feature cache, distillation and the attacks. robustbench's own `__init__` imports autoattack, gdown and geotorch;
the architectures need torch alone, so they are imported from the installed package without running it (where the
whole package imports, `load_model` is tested on a local checkpoint file as well)."""
import importlib, importlib.util, re, sys, types, warnings
from pathlib import Path
from collections import OrderedDict
import pytest, torch
import torchvision
from torch import nn
from fastai.data.core import DataLoaders
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from rtl_fastai.core import input_stats, check_normalization
from rtl_fastai.data.all import task_dls
from rtl_fastai.models import model_blocks, block_splitter, pooled_features, replace_head, penultimate, forward_to
from rtl_fastai.callback.transfer import transfer_learner
from rtl_fastai.callback.distill import FeatureDistillation
from rtl_fastai.callback.adv_valid import robust_validate

torch.set_num_threads(1)
_ARCH = 'robustbench.model_zoo.architectures.'
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


@pytest.fixture(scope='module')
def rb():
    "The modules of robustbench's architectures, by short name"
    if importlib.util.find_spec('robustbench') is None:
        pytest.skip("robustbench is not installed (scripts/test.sh installs it: "
                    "pip install --no-deps robustbench==1.1.1)")
    saved = {k: v for k, v in sys.modules.items() if k == 'robustbench' or k.startswith('robustbench.')}
    try: import robustbench  # noqa: F401
    except ImportError:  # its dependencies are missing: the packages as plain namespaces, their `__init__` not run
        for name in ('robustbench', 'robustbench.model_zoo'):
            spec = importlib.util.find_spec(name)
            pkg = types.ModuleType(name)
            pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
            sys.modules[name] = pkg
    yield {k: importlib.import_module(_ARCH + k) for k in ('wide_resnet', 'dm_wide_resnet', 'resnet', 'utils_architectures')}
    for k in [k for k in sys.modules if k == 'robustbench' or k.startswith('robustbench.')]:
        if k not in saved: del sys.modules[k]


def _subclass(wrn):
    "As RobustBench's `Rice2020OverfittingNet`: a WideResNet whose forward normalizes with buffers `mu`/`sigma` first"
    class Normalized(wrn.WideResNet):
        def __init__(self):
            super().__init__(depth=10, widen_factor=1)
            self.register_buffer('mu', torch.tensor(CIFAR10[0]).view(1, 3, 1, 1))
            self.register_buffer('sigma', torch.tensor(CIFAR10[1]).view(1, 3, 1, 1))
        def forward(self, x): return super().forward((x - self.mu) / self.sigma)
    return Normalized()


# name: (factory from the modules, n entries, n features, the statistics the model normalizes with itself)
CASES = {
    'WideResNet':         (lambda rb: rb['wide_resnet'].WideResNet(depth=10, widen_factor=1), 6, 64, None),
    'WideResNet+sub':     (lambda rb: rb['wide_resnet'].WideResNet(depth=10, widen_factor=1, sub_block1=True),
                           6, 64, None),
    'DMWideResNet':       (lambda rb: rb['dm_wide_resnet'].DMWideResNet(depth=10, width=1), 6, 64, CIFAR10),
    'DMPreActResNet':     (lambda rb: rb['dm_wide_resnet'].DMPreActResNet(depth=18), 7, 512, CIFAR10),
    'ResNet':             (lambda rb: rb['resnet'].ResNet(rb['resnet'].BasicBlock, [1, 1, 1, 1]), 7, 512, None),
    'PreActResNet':       (lambda rb: rb['resnet'].PreActResNet(rb['resnet'].PreActBlock, [1, 1, 1, 1],
                                                                bn_before_fc=True), 7, 512, None),
    'subclass mu/sigma':  (lambda rb: _subclass(rb['wide_resnet']), 6, 64, CIFAR10),
    'normalize_model':    (lambda rb: rb['utils_architectures'].normalize_model(
                               torchvision.models.resnet18(weights=None), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                           7, 512, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
}


@pytest.mark.parametrize('name', list(CASES))
def test_blocks_features_head_and_stats(rb, name):
    "The blocks run input -> output, hold every parameter once; features are the head's input; the stats are found"
    make, n, nf, stats = CASES[name]
    torch.manual_seed(0)
    m, x = make(rb).eval(), torch.rand(2, 3, 32, 32)
    mb = model_blocks(m)
    assert len(mb.all) == n
    with torch.no_grad(): torch.testing.assert_close(nn.Sequential(*mb.all)(x), m(x))
    flat = [p for g in block_splitter(m) for p in g]
    assert sorted(map(id, flat)) == sorted(id(p) for p in m.parameters())
    f = pooled_features(m, x)
    assert f.shape == (2, nf)
    head_in = forward_to(m, mb.head, x)
    torch.testing.assert_close(f, head_in.flatten(1))
    st = input_stats(m)
    if stats is None: assert st is None
    else: torch.testing.assert_close(st[0].flatten(), torch.tensor(stats[0]))
    replace_head(m, 3)
    assert m(x).shape == (2, 3) and model_blocks(m).head.out_features == 3


def test_stem_runs_the_models_own_forward(rb):
    "A subclass that changes the input first (RobustBench's `Hendrycks2019UsingNet`: 2x-1) keeps it in the stem"
    class Rescaled(rb['wide_resnet'].WideResNet):
        def forward(self, x): return super().forward(2*x - 1)
    torch.manual_seed(0)
    m, x = Rescaled(depth=10, widen_factor=1).eval(), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model_blocks(m).stem(x), m.conv1(2*x - 1))
        torch.testing.assert_close(nn.Sequential(*model_blocks(m).all)(x), m(x))



def _fit(learn, n=1, lr=1e-3, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, lr, **kw)
    return learn


def test_transfer_cache_distillation_and_attack(rb, digits_rgb32):
    "A RobustBench CIFAR model (normalizing itself) as the source: frozen transfer with the feature cache, fine-tuning "
    "with distillation, and PGD in pixel units on [0,1] DataLoaders"
    set_seed(0)
    src = rb['dm_wide_resnet'].DMWideResNet(depth=10, width=1).eval()
    dls = task_dls(digits_rgb32, bs=20, normalize=False)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the model normalizes itself and the DataLoaders do not: nothing to say
        learn = transfer_learner(src, dls, n_retrain=1, metrics=accuracy)
    frozen = {k: v.clone() for k, v in model_blocks(learn.model).stem.state_dict().items()}
    _fit(learn, 2)
    assert learn.feature_cache.active, learn.feature_cache.reason
    assert all(torch.equal(v, model_blocks(learn.model).stem.state_dict()[k]) for k, v in frozen.items())
    r = robust_validate(learn, threat=2/255, n_batches=1, show_progress=False)
    assert 0 <= r['robust_acc'] <= r['clean_acc']
    ft = transfer_learner(src, dls, n_retrain='all', metrics=accuracy)
    fd = FeatureDistillation(src, lam=1e-2)
    _fit(ft, 2, cbs=fd)
    assert fd.train_term is not None and fd.train_term > 0


def test_normalizing_twice_is_said(rb, digits_rgb32):
    "A RobustBench model normalizes itself: DataLoaders with fastai's `Normalize` as well get a warning naming both"
    m = rb['dm_wide_resnet'].DMWideResNet(depth=10, width=1)
    dls = task_dls(digits_rgb32, bs=20, normalize=False)
    dls.add_tfms([Normalize.from_stats(*CIFAR10, cuda=False)], 'after_batch')
    with pytest.warns(UserWarning, match=r"normalized twice: the model normalizes inside \(DMWideResNet's mean/std"):
        check_normalization(m, dls, 'demo')


def test_load_model_on_a_local_file(rb, tmp_path, monkeypatch, digits_rgb32):
    "robustbench's own `load_model` (where the whole package imports), reading a checkpoint already in `model_dir`"
    try: from robustbench.utils import load_model
    except ImportError as e: pytest.skip(f"robustbench's `load_model` needs its dependencies: {e}")
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet, Swish
    net = DMWideResNet(num_classes=10, depth=28, width=10, activation_fn=Swish)
    (tmp_path/'cifar10'/'Linf').mkdir(parents=True)
    torch.save({'state_dict': OrderedDict(('module.' + k, v) for k, v in net.state_dict().items())},
               tmp_path/'cifar10'/'Linf'/'Gowal2020Uncovering_28_10_extra.pt')
    m = load_model('Gowal2020Uncovering_28_10_extra', model_dir=tmp_path, dataset='cifar10', threat_model='Linf')
    assert len(model_blocks(m).all) == 6 and input_stats(m) is not None
    learn = transfer_learner(m, task_dls(digits_rgb32, bs=20, normalize=False), n_retrain=0, metrics=accuracy)
    _fit(learn, 1)
    assert learn.feature_cache.active
    # and through the job's `robustbench:` source, which calls the same `load_model` on its cache folder
    from rtl_fastai.data.folder import make_image_folder
    from rtl_fastai.job import transfer_job
    import shutil
    monkeypatch.setenv('RTL_CACHE', str(tmp_path/'cache'))
    shutil.copytree(tmp_path/'cifar10', tmp_path/'cache'/'robustbench'/'cifar10')
    folder = make_image_folder(tmp_path/'shapes', n_per_class=4, n_valid=2, classes=3, size=32)
    res = transfer_job(folder, source='robustbench:cifar10/Linf/Gowal2020Uncovering_28_10_extra', size=32, bs=4,
                       epochs=1, steps=1, curve=False, quiet=True, out=str(tmp_path/'out'), n_batches=1)
    assert res['source']['arch'] == 'DMWideResNet' and 0 <= res['pgd_acc'] <= res['clean_acc']


@pytest.fixture
def fake_load_model(rb, monkeypatch):
    "robustbench's `load_model` (its dependencies are missing here): a DMWideResNet, as load_model gives its CIFAR models"
    calls = []
    def load_model(model_name, model_dir, dataset, threat_model):
        calls.append((model_name, str(model_dir), dataset, threat_model))
        torch.manual_seed(0)
        return rb['dm_wide_resnet'].DMWideResNet(depth=10, width=1).eval()
    monkeypatch.setitem(sys.modules, 'robustbench.utils', types.SimpleNamespace(load_model=load_model))
    return calls


def test_transfer_job_from_a_robustbench_source(fake_load_model, tmp_path, monkeypatch):
    "`source='robustbench:cifar10/Linf/NAME'`: robustbench's `load_model` into the cache, no `Normalize` in the "
    "DataLoaders (the model normalizes itself), the leaderboard's threat model in the description"
    from rtl_fastai.data.folder import make_image_folder
    from rtl_fastai.job import transfer_job
    monkeypatch.setenv('RTL_CACHE', str(tmp_path/'cache'))
    folder = make_image_folder(tmp_path/'shapes', n_per_class=8, n_valid=4, classes=3, size=32)
    kw = dict(size=32, bs=8, epochs=1, steps=2, seed=0, curve=False, quiet=True, out=str(tmp_path/'out'))
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)   # no double normalization, no threat-model mismatch
        res = transfer_job(folder, source='robustbench:cifar10/Linf/Carmon2019Unlabeled', eps='8/255', **kw)
    assert fake_load_model == [('Carmon2019Unlabeled', str(tmp_path/'cache'/'robustbench'), 'cifar10', 'Linf')]
    assert res['source']['threat'] == 'Linf eps=8/255' and res['source']['arch'] == 'DMWideResNet'
    assert 0 <= res['pgd_acc'] <= res['clean_acc'] and input_stats(res['learn'].model) is not None
    assert not [t for t in res['learn'].dls.after_batch.fs if type(t).__name__ == 'Normalize']
    with pytest.raises(RuntimeError, match=r"needs another input size \(`size`=.*; CIFAR models: size=32\)"):
        transfer_job(folder, source='robustbench:cifar10/Linf/Carmon2019Unlabeled', **{**kw, 'size': 64})
    with pytest.raises(ValueError, match=r"'robustbench:DATASET/THREAT/NAME'"):
        transfer_job(folder, source='robustbench:Carmon2019Unlabeled', **kw)
    with pytest.raises(ValueError, match=r"leave `stats` out for a RobustBench source"):
        transfer_job(folder, source='robustbench:cifar10/Linf/Carmon2019Unlabeled', stats='imagenet', **kw)


def test_a_robustbench_architecture_of_its_own_is_not_its_base(rb):
    "`BoostingWideResNet` subclasses WideResNet but rewrites its head in its forward: not split as a WideResNet"
    from rtl_fastai.models import model_blocks
    bw = importlib.import_module(_ARCH + 'boosting_wide_resnet')
    with pytest.raises(TypeError, match='set_blocks'): model_blocks(bw.BoostingWideResNet(depth=10, widen_factor=1))


def test_checkpoints_into_models_that_normalize(rb, tmp_path):
    "RobustBench's zoo files lack the `mu`/`sigma` of the classes that normalize in their forward, and a "
    "`normalize_model`'s own state dict holds its `normalize.*` buffers: both load, the model's statistics kept; a "
    "file that stores other statistics than the model's is refused"
    from rtl_fastai.checkpoint import load_robust_checkpoint
    im = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    net = _subclass(rb['wide_resnet'])
    torch.save({'state_dict': OrderedDict(('module.' + k, v) for k, v in net.state_dict().items()
                                          if k not in ('mu', 'sigma'))}, tmp_path/'zoo.pt')
    m = load_robust_checkpoint(_subclass(rb['wide_resnet']), tmp_path/'zoo.pt')
    assert torch.equal(m.conv1.weight, net.conv1.weight) and torch.equal(m.mu.flatten(), torch.tensor(CIFAR10[0]))
    madry = {'model': {**{f'module.model.{k}': v for k, v in net.state_dict().items() if k not in ('mu', 'sigma')},
                       'module.normalizer.new_mean': torch.tensor(im[0]).view(3, 1, 1),
                       'module.normalizer.new_std': torch.tensor(im[1]).view(3, 1, 1)}}
    torch.save(madry, tmp_path/'madry.pt')
    with pytest.raises(ValueError, match='normalizes its inputs itself .* other statistics'):
        load_robust_checkpoint(_subclass(rb['wide_resnet']), tmp_path/'madry.pt')
    nm = rb['utils_architectures'].normalize_model
    src = nm(torchvision.models.resnet18(), *im)
    torch.save(src.state_dict(), tmp_path/'full.pt')
    torch.save(src.model.state_dict(), tmp_path/'inner.pt')
    for f in ('full.pt', 'inner.pt'):
        m = load_robust_checkpoint(nm(torchvision.models.resnet18(), *im), tmp_path/f)
        assert torch.equal(m.model.conv1.weight, src.model.conv1.weight), f
    # a torchvision `Normalize` in front of the network: a MadryLab file of the network loads into it
    madry = {'model': {**{f'module.model.{k}': v for k, v in src.model.state_dict().items()},
                       'module.normalizer.new_mean': torch.tensor(im[0]).view(3, 1, 1),
                       'module.normalizer.new_std': torch.tensor(im[1]).view(3, 1, 1)}}
    torch.save(madry, tmp_path/'madry_r18.pt')
    m = load_robust_checkpoint(nn.Sequential(torchvision.transforms.Normalize(*im), torchvision.models.resnet18()),
                               tmp_path/'madry_r18.pt')
    assert torch.equal(m[1].conv1.weight, src.model.conv1.weight)


def test_cifar_model_on_larger_images_is_said(rb, digits_rgb32):
    "A CIFAR network (RobustBench's WideResNet pools 8x8) on 64x64 images: `transfer_learner` says it needs another "
    "input size, instead of a batch-size mismatch in the loss at the first `fit`"
    import torch.nn.functional as F
    from rtl_fastai.data.all import ArrayData
    d = digits_rgb32
    up = lambda x: F.interpolate(x, size=64, mode='nearest')
    big = ArrayData(up(d.x_train), d.y_train, up(d.x_valid), d.y_valid, d.classes, 'digits-64')
    wrn = rb['wide_resnet'].WideResNet(depth=10, widen_factor=1)
    with pytest.raises(RuntimeError, match=r"output of shape \(8, \d+\) for 2 images of \(3, 64, 64\): it needs another "
                                           r"input size \(a CIFAR model takes 32x32 images"):
        transfer_learner(wrn, task_dls(big, bs=20, normalize=False))
    transfer_learner(wrn, task_dls(d, bs=20, normalize=False))   # 32x32: fine


def test_a_broken_robustbench_download_is_named(rb, tmp_path, monkeypatch):
    "robustbench downloads straight into its cache file and trusts it from then on: a file it cannot load (an "
    "interrupted download) is named, with what to do"
    from rtl_fastai.job import load_source
    monkeypatch.setenv('RTL_CACHE', str(tmp_path/'cache'))
    f = tmp_path/'cache'/'robustbench'/'cifar10'/'Linf'/'Carmon2019Unlabeled.pt'
    def load_model(model_name, model_dir, dataset, threat_model):
        return torch.load(Path(model_dir)/dataset/threat_model/f'{model_name}.pt')
    monkeypatch.setitem(sys.modules, 'robustbench.utils', types.SimpleNamespace(load_model=load_model))
    f.parent.mkdir(parents=True); f.write_bytes(b'PK\x03\x04 cut off')
    with pytest.raises(RuntimeError, match=rf"could not load {re.escape(str(f))} .*Delete that file and run again"):
        load_source('robustbench:cifar10/Linf/Carmon2019Unlabeled')
    f.unlink()   # no file: robustbench's own error, as it is
    with pytest.raises(FileNotFoundError): load_source('robustbench:cifar10/Linf/Carmon2019Unlabeled')
