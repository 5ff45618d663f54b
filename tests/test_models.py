"Block addressing, splitting, feature shapes, head replacement and freezing on every supported model family."
import copy, subprocess, sys
import pytest, torch
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.models import resnet18, resnet50
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat
from fastai.vision.learner import vision_learner
from fastai.vision.models import resnet18 as fa_resnet18
from rtl_fastai.models import *

torch.manual_seed(0)

def _vision_learner_model():
    ds = TensorDataset(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    dls = DataLoaders.from_dsets(ds, ds, bs=4)
    return vision_learner(dls, fa_resnet18, pretrained=False, n_out=10, loss_func=CrossEntropyLossFlat()).model

# name: (model factory, input shape, n_out, feature shape for batch 2, n_entries)
CASES = {
    'smallcnn8':   (lambda: SmallCNN(widths=(8, 16)), (1, 8, 8), 10, (2, 16), 5),
    'smallcnn28':  (lambda: SmallCNN(widths=(8, 16), p_drop=0.1), (1, 28, 28), 10, (2, 16), 5),
    'preact18':    (lambda: PreActResNet18(width=4), (3, 32, 32), 10, (2, 32), 7),
    'wrn16_1':     (lambda: WideResNet(16, 1), (3, 32, 32), 10, (2, 64), 6),
    'wrn14_1':     (lambda: WideResNet(14, 1, p_drop=0.1), (3, 32, 32), 10, (2, 64), 6),  # Madry counting, 2 units
    'tv_resnet18': (lambda: resnet18(weights=None), (3, 32, 32), 1000, (2, 512), 7),
    'tv_resnet50': (lambda: resnet50(weights=None), (3, 32, 32), 1000, (2, 2048), 7),
    'vision_learner': (_vision_learner_model, (3, 32, 32), 10, (2, 512, 1, 1), 6),
}

@pytest.fixture(params=list(CASES), scope='module')
def case(request):
    make, shp, n_out, fshape, nb = CASES[request.param]
    return make().eval(), torch.rand(2, *shp), n_out, fshape, nb

def _ids(ps): return sorted(id(p) for p in ps)

def test_forward_and_sequential_blocks(case):
    m, x, n_out, _, nb = case
    out = m(x)
    assert out.shape == (2, n_out)
    mb = model_blocks(m)
    assert len(mb.all) == n_entries(m) == nb
    assert all(isinstance(b, nn.Module) for b in mb.all)
    torch.testing.assert_close(nn.Sequential(*mb.all)(x), out)  # blocks run input -> output

def test_blocks_share_modules(case):
    m, *_ = case
    mods = {id(mod) for mod in m.modules()}
    for b in model_blocks(m).all:  # every parameter of every block is a parameter of the model (no copies)
        assert {id(p) for p in b.parameters()} <= {id(p) for p in m.parameters()}
    assert id(head_module(m)) in mods

def test_splitter_partition(case):
    m, *_ = case
    groups = block_splitter(m)
    assert all(len(g) > 0 for g in groups)
    flat = [p for g in groups for p in g]
    assert len(flat) == len(set(map(id, flat)))        # each once
    assert _ids(flat) == _ids(m.parameters())          # all of them

def test_features_are_head_input(case):
    m, x, _, fshape, _ = case
    assert tuple(feature_shape(m, x)) == fshape
    seen = []
    h = head_module(m).register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].shape))
    with torch.no_grad(): m(x)
    h.remove()
    assert tuple(seen[0]) == fshape

def test_replace_head(case):
    m, x, *_ = case
    old = head_module(m)
    replace_head(m, 3)
    assert head_module(m) is not old
    assert m(x).shape == (2, 3)
    assert _ids(p for g in block_splitter(m) for p in g) == _ids(m.parameters())

def test_freeze_blocks(case):
    m, *_ = case
    entries = model_blocks(m).all
    for k in (0, 1, len(entries) - 1, len(entries)):
        freeze_blocks(m, k)
        for i, b in enumerate(entries):
            assert all(p.requires_grad == (i >= k) for p in b.parameters())
    freeze_blocks(m, 0)
    assert all(p.requires_grad for p in m.parameters())
    for bad in (-1, len(entries) + 1, 1.5):
        with pytest.raises(ValueError, match=rf"\[0, {len(entries)}\]"): freeze_blocks(m, bad)

def test_unsupported_model():
    for m in (nn.Linear(3, 4), nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))):
        with pytest.raises(TypeError, match='set_blocks'): model_blocks(m)
        with pytest.raises(TypeError, match='set_blocks'): block_splitter(m)
        with pytest.raises(TypeError, match='set_blocks'): freeze_blocks(m, 0)

def test_set_blocks_custom_model():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    set_blocks(m, stem=m[0:2], blocks=[m[2:4]], head=m[4])
    assert n_entries(m) == 3 and len(block_splitter(m)) == 3
    x = torch.rand(5, 4)
    assert tuple(feature_shape(m, x)) == (5, 8)
    replace_head(m, 6)
    assert m(x).shape == (5, 6) and head_module(m) is m[4]
    with pytest.raises(ValueError, match='exactly once'): set_blocks(m, stem=m[0], blocks=[], head=m[4])

def test_wrn_depth_conventions():
    units = lambda m: [sum(isinstance(c, PreActBlock) for c in b.children()) for b in m.blocks]
    assert units(WideResNet(28, 1)) == [4, 4, 4]   # standard: depth = 6n+4
    assert units(WideResNet(32, 1)) == [5, 5, 5]   # Madry/Shafahi: depth = 6n+2
    assert units(WideResNet(34, 1)) == [5, 5, 5]   # WRN-34 (TRADES) is the same network as WRN-32
    assert wrn_units(28) == 4 and wrn_units(32) == 5 and wrn_units(34) == 5
    assert WideResNet(32, 1).units == 5
    for bad in (30, 27, 4, 0, '28'):
        with pytest.raises(ValueError, match='depth'): WideResNet(bad, 1)

def test_normalize_input():
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(NormalizeInput(mean, std)(x), (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    torch.testing.assert_close(NormalizeInput(mean.tolist(), std.view(1, 3, 1, 1))(x), (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    with pytest.raises(ValueError, match='std'): NormalizeInput(mean, [0.1, 0., 0.2])
    # stats inside the model == normalizing the input outside the model
    torch.manual_seed(1); a = SmallCNN(3, widths=(8,), stats=(mean, std)).eval()
    torch.manual_seed(1); b = SmallCNN(3, widths=(8,)).eval()
    assert isinstance(a.stem.norm, NormalizeInput)
    b.load_state_dict(a.state_dict())  # same keys: the stats are not in the state dict
    torch.testing.assert_close(a(x), b((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)))

# pooled penultimate feature size per case (one definition for every wrapper)
POOLED = {'smallcnn8': 16, 'smallcnn28': 16, 'preact18': 32, 'wrn16_1': 64, 'wrn14_1': 64, 'tv_resnet18': 512,
          'tv_resnet50': 2048, 'vision_learner': 512}

@pytest.mark.parametrize('name', list(CASES))
def test_pooled_features(name):
    make, shp, *_ = CASES[name]
    m = make().train()
    x = torch.rand(2, *shp)
    f = pooled_features(m, x)
    assert f.shape == (2, POOLED[name]) and m.training  # eval inside, mode restored
    p = penultimate(m)
    assert any(mod is p.module for mod in m.modules())  # a submodule the forward calls: hookable
    seen = []
    h = p.module.register_forward_hook(lambda mod, inp, out: seen.append(p.hook_func(mod, inp, out)))
    m.eval()
    with torch.no_grad(): m(x)
    h.remove()
    torch.testing.assert_close(seen[0], f, rtol=0, atol=0)
    if name != 'vision_learner':  # the classifier reads exactly these features (in eval mode)
        torch.testing.assert_close(head_module(m)(f), m(x))

def test_pooled_features_same_body_any_wrapper():
    "A torchvision ResNet-18 and a `vision_learner` model with the same body weights give identical pooled features."
    tv = resnet18(weights=None).eval()
    vm = _vision_learner_model().eval()
    for i, n in enumerate(['conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4']):
        vm[0][i].load_state_dict(getattr(tv, n).state_dict())
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(pooled_features(vm, x), pooled_features(tv, x), rtol=0, atol=0)
    assert tuple(feature_shape(vm, x)) != tuple(feature_shape(tv, x))  # unlike the heads' inputs

def test_stage_references_and_deepcopy():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    m.scale = nn.Parameter(torch.ones(8))
    stem = Stage(m, lambda mod, x: mod[1](mod[0](x)) * mod.scale, lin=m[0], scale=m.scale)
    set_blocks(m, stem=stem, blocks=[], head=m[2])
    x = torch.rand(3, 4)
    torch.testing.assert_close(nn.Sequential(*model_blocks(m).all)(x), m[2](m[1](m[0](x)) * m.scale))
    assert stem.scale is m.scale and stem.lin is m[0] and list(stem.state_dict()) == ['scale', 'lin.weight', 'lin.bias']
    freeze_blocks(m, 1)
    assert not m.scale.requires_grad and not m[0].weight.requires_grad and m[2].weight.requires_grad
    m2 = copy.deepcopy(m)  # the declared blocks follow the copy: nothing points at the original
    st2 = model_blocks(m2).stem
    assert st2.owner is m2 and st2.scale is m2.scale and st2.lin is m2[0] and model_blocks(m2).head is m2[2]
    with pytest.raises(TypeError, match='part `bad`'): Stage(m, lambda mod, x: x, bad=3)

def test_set_blocks_names_parameters_in_no_block_or_two():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r'in no block: 2\.weight, 2\.bias\.'): set_blocks(m, stem=m[0], blocks=[], head=m[3])
    with pytest.raises(ValueError, match=r'in two blocks: 2\.weight, 2\.bias'): set_blocks(m, stem=m[0:3], blocks=[m[2]], head=m[3])

def test_imports_without_timm():
    "timm is optional: the library imports and works on torchvision models when timm cannot be imported."
    code = ("import sys; sys.modules['timm'] = None\n"
            "import torch, torchvision, rtl_fastai.models as M, rtl_fastai.callback.transfer\n"
            "m = torchvision.models.resnet18()\n"
            "assert M.pooled_features(m, torch.rand(1, 3, 32, 32)).shape == (1, 512) and len(M.model_blocks(m).blocks) == 4\n"
            "assert sys.modules['timm'] is None")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_freeze_blocks_numpy_int():
    "`freeze_blocks` takes a NumPy integer, as `FreezeBlocks` does"
    import numpy as np
    m = SmallCNN()
    freeze_blocks(m, np.int64(2))
    assert [any(p.requires_grad for p in e.parameters()) for e in model_blocks(m).all if list(e.parameters())] == [False, False, True, True]
