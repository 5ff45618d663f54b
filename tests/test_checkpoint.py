"Robust checkpoint loading: every supported layout, weights_only refusal, key/shape errors, URLs (on local files)."
import shutil, warnings, pickle
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

def test_url_download_is_cached(tmp_path, src, monkeypatch):
    torch.save(src.state_dict(), tmp_path/'w.pt')
    calls = []
    def fake(url, dest): calls.append((url, dest)); shutil.copy(tmp_path/'w.pt', dest)
    monkeypatch.setattr(ck, '_download', fake)
    url = 'https://example.org/robust/cifar_linf_8.pt'
    for _ in range(2): _same(load_robust_checkpoint(_src(), url, cache=tmp_path/'cache'), src)
    assert len(calls) == 1 and calls[0][0] == url and str(calls[0][1]).endswith('-cifar_linf_8.pt')
    # another URL with the same file name does not overwrite the first download
    other = 'https://example.com/other/cifar_linf_8.pt'
    load_robust_checkpoint(_src(), other, cache=tmp_path/'cache')
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
