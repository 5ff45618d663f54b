"timm and torchvision models without `set_blocks`: blocks, heads, pooled features and robust transfer on each family."
import copy
import pytest
import torch
import torchvision
from torch import nn
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner
from fastai.vision.models import resnet18 as fa_resnet18
from rtl_fastai.data.all import ArrayData, task_dls
from rtl_fastai.models import (model_blocks, block_splitter, replace_head, head_module, penultimate, pooled_features,
                               set_blocks, Stage, n_entries)
from rtl_fastai.callback.transfer import transfer_learner, n_frozen_entries
import rtl_fastai.callback.adv_valid  # noqa: F401  (Learner.robust_validate)

timm = pytest.importorskip('timm', reason="timm is an optional dependency (pip install timm): timm models are not tested")

torch.set_num_threads(1)

def _tv_vit():   # a small torchvision ViT (same class as vit_b_16) on 32x32 images
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)

def _tv_convnext():  # a small torchvision ConvNeXt (same class and layout as convnext_tiny)
    from torchvision.models.convnext import CNBlockConfig
    return torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1),
                                        CNBlockConfig(64, None, 1)])

# name: (factory, number of blocks)
MODELS = {
    'timm_resnet18':     (lambda: timm.create_model('resnet18', pretrained=False), 4),
    'timm_convnext':     (lambda: timm.create_model('convnext_atto', pretrained=False), 4),
    'timm_efficientnet': (lambda: timm.create_model('efficientnet_b0', pretrained=False), 7),
    'timm_vit':          (lambda: timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32), 12),
    'timm_deit_distilled': (lambda: timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, img_size=32), 12),
    'tv_resnet18':       (lambda: torchvision.models.resnet18(weights=None), 4),
    'tv_vit':            (_tv_vit, 2),
    'tv_convnext':       (_tv_convnext, 4),
    'tv_efficientnet':   (lambda: torchvision.models.efficientnet_b0(weights=None), 7),
}
TRANSFER = ['timm_resnet18', 'timm_convnext', 'timm_efficientnet', 'timm_vit', 'timm_deit_distilled', 'tv_resnet18', 'tv_vit',
            'tv_convnext', 'tv_efficientnet']

def _make(name):
    set_seed(0)
    return MODELS[name][0]()

@pytest.fixture(scope='module')
def dls():
    "A tiny synthetic 2-class task of 3x32x32 images (16 train, 8 valid), no augmentation."
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 3, 32, 32, generator=g), torch.arange(24) % 2
    x[y == 1, 0] += 0.5  # learnable: class 1 is redder
    x = x.clamp(0, 1)
    return task_dls(ArrayData(x[:16], y[:16], x[16:], y[16:], ['a', 'b'], 'synthetic'), bs=8, normalize=False)

def _ids(ps): return sorted(id(p) for p in ps)

@pytest.mark.parametrize('name', list(MODELS))
def test_blocks_reproduce_forward(name):
    m, nb = _make(name).eval(), MODELS[name][1]
    x = torch.rand(2, 3, 32, 32)
    mb = model_blocks(m)
    assert len(mb.blocks) == nb
    with torch.no_grad(): torch.testing.assert_close(nn.Sequential(*mb.all)(x), m(x), rtol=0, atol=0)
    flat = [p for g in block_splitter(m) for p in g]   # every parameter in exactly one entry (cls/pos tokens included)
    assert len(flat) == len(set(map(id, flat))) and _ids(flat) == _ids(m.parameters())
    # the entries reference the model's own parameters: freezing an entry freezes the model
    for e in mb.all: assert {id(p) for p in e.parameters()} <= {id(p) for p in m.parameters()}

@pytest.mark.parametrize('name', list(MODELS))
def test_replace_head(name):
    m = _make(name).eval()
    x = torch.rand(2, 3, 32, 32)
    body = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad(): f0 = pooled_features(m, x)
    replace_head(m, 3)
    assert m(x).shape == (2, 3)
    torch.testing.assert_close(pooled_features(m, x), f0, rtol=0, atol=0)  # only the classifier changed
    changed = [k for k in body if k not in m.state_dict() or not torch.equal(m.state_dict()[k], body[k])]
    assert changed and all(k.split('.')[0] in ('fc', 'head', 'head_dist', 'classifier', 'heads') for k in changed), changed
    assert _ids(p for g in block_splitter(m) for p in g) == _ids(m.parameters())

def test_vit_tokens_in_the_stem():
    m = _make('timm_vit')
    stem = model_blocks(m).stem
    assert isinstance(stem, Stage) and stem.cls_token is m.cls_token and stem.pos_embed is m.pos_embed
    assert model_blocks(m).blocks[-1][-1] is m.norm  # the final norm ends the last block (timm's layer-decay grouping)
    d = model_blocks(_make('timm_deit_distilled')).stem
    assert {'cls_token', 'pos_embed', 'dist_token'} <= set(n for n, _ in d.named_parameters())
    tv = _make('tv_vit')
    assert model_blocks(tv).stem.pos_embedding is tv.encoder.pos_embedding

def test_deepcopy_keeps_stages_consistent():
    m = _make('timm_vit').eval()
    m2 = copy.deepcopy(m)
    st = model_blocks(m2).stem
    assert st.owner is m2 and st.cls_token is m2.cls_token
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(nn.Sequential(*model_blocks(m2).all)(x), m(x), rtol=0, atol=0)

def _frozen_state(model, n):
    return {f'{i}.{k}': v.clone() for i, e in enumerate(model_blocks(model).all[:n]) for k, v in e.state_dict().items()}

@pytest.mark.parametrize('name', TRANSFER)
def test_transfer_learner(name, dls):
    src = _make(name).eval()
    for n_retrain in (0, 1, 'all'):
        set_seed(0)
        learn = transfer_learner(src, dls, n_retrain=n_retrain, lr=1e-3)
        nf = n_frozen_entries(learn.model, n_retrain)
        frozen0 = _frozen_state(learn.model, nf)
        trainable0 = [p.detach().clone() for p in learn.model.parameters() if p.requires_grad]
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
        frozen1 = _frozen_state(learn.model, nf)
        assert frozen0.keys() == frozen1.keys() and (len(frozen0) > 0) == (n_retrain != 'all')
        for k in frozen0: assert torch.equal(frozen0[k], frozen1[k]), (name, n_retrain, k)  # weights and BN buffers
        trainable1 = [p for p in learn.model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(trainable0, trainable1)), (name, n_retrain)
        fc = learn.feature_cache
        assert fc.active == (n_retrain != 'all'), (name, n_retrain, fc.reason)
    r = learn.robust_validate(eps=2/255, steps=2, show_progress=False)
    assert r['n'] == 8 and 0 <= r['robust_acc'] <= r['clean_acc'] <= 1

def _vl(dls, arch, **kw):
    set_seed(0)
    return vision_learner(dls, arch, pretrained=False, normalize=False, **kw).model.eval()

def test_pooled_features_torchvision_vs_vision_learner(dls):
    tv = _make('tv_resnet18').eval()
    vm = _vl(dls, fa_resnet18)
    body = vm[0]
    for i, n in enumerate(['conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4']):
        body[i].load_state_dict(getattr(tv, n).state_dict())
    x = torch.rand(4, 3, 32, 32)
    f_tv, f_vl = pooled_features(tv, x), pooled_features(vm, x)
    assert f_tv.shape == (4, 512)
    torch.testing.assert_close(f_vl, f_tv, rtol=0, atol=0)
    torch.testing.assert_close(tv.fc(f_tv), tv(x))  # and it is what torchvision's classifier reads

@pytest.mark.parametrize('arch,kw', [('resnet18', {}), ('convnext_atto', {}), ('vit_tiny_patch16_224', dict(img_size=32))])
def test_pooled_features_timm_vs_vision_learner(dls, arch, kw):
    set_seed(0)
    tm = timm.create_model(arch, pretrained=False, **kw).eval()
    vm = _vl(dls, arch, **kw)
    missing, unexpected = vm[0].model.load_state_dict(tm.state_dict(), strict=False)
    assert not missing and all(k.split('.')[0] in ('fc', 'head') for k in unexpected)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(pooled_features(vm, x), pooled_features(tm, x), rtol=0, atol=0)
    # the fastai wrapper of a timm model: its blocks reproduce its forward, the head is fastai's
    with torch.no_grad(): torch.testing.assert_close(nn.Sequential(*model_blocks(vm).all)(x), vm(x), rtol=0, atol=0)
    assert head_module(vm) is vm[1] and n_entries(vm) >= len(model_blocks(tm).blocks) + 2

def test_penultimate_hook_usable_in_training():
    "The `Penultimate` hook gives the features of the forward in progress, with gradients (as distillation needs)."
    from fastai.callback.hook import Hook
    m = _make('timm_convnext').train()
    p = penultimate(m)
    x = torch.rand(2, 3, 32, 32)
    with Hook(p.module, p.hook_func, detach=False) as h:
        m(x)
        f = h.stored
    assert f.shape == (2, 320) and f.requires_grad
    f.sum().backward()
    assert m.stem[0].weight.grad is not None

@pytest.mark.parametrize('arch,kw', [('resnet18', {}), ('vit_tiny_patch16_224', dict(img_size=32))])
def test_vision_learner_timm_transfer(dls, arch, kw):
    "A fastai `vision_learner` on a timm model is a transfer source too (its own head is rebuilt by fastai)."
    set_seed(0)
    src = vision_learner(dls, arch, pretrained=False, normalize=False, **kw)
    learn = transfer_learner(src, dls, n_retrain=1)
    frozen0 = _frozen_state(learn.model, n_frozen_entries(learn.model, 1))
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    for k, v in _frozen_state(learn.model, n_frozen_entries(learn.model, 1)).items(): assert torch.equal(v, frozen0[k]), k
    assert learn.feature_cache.active, learn.feature_cache.reason

def test_set_blocks_names_missing_parameters():
    m = _make('timm_vit')
    with pytest.raises(ValueError, match=r'in no block: cls_token, pos_embed, norm\.weight, norm\.bias\. '):
        set_blocks(m, stem=m.patch_embed, blocks=list(m.blocks), head=m.head)  # tokens and final norm forgotten

@pytest.mark.parametrize('pair', ['tv->vision_learner', 'vision_learner->tv', 'timm->vision_learner'])
def test_feature_distillation_across_wrappers(dls, pair):
    from fastai.learner import Learner
    from rtl_fastai.callback.distill import FeatureDistillation
    src, dst = pair.split('->')
    source = {'tv': lambda: _make('tv_resnet18'), 'timm': lambda: _make('timm_resnet18'),
              'vision_learner': lambda: _vl(dls, fa_resnet18)}[src]().eval()
    fd = FeatureDistillation(source, lam=5e-3)
    if dst == 'vision_learner': learn = vision_learner(dls, fa_resnet18, pretrained=False, normalize=False, cbs=fd)
    else: learn = Learner(dls, replace_head(_make('tv_resnet18'), 2), cbs=fd)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert torch.isfinite(torch.as_tensor(learn.recorder.losses[-1]))
    # the logged validation term is lam * the L1 distance of the two pooled penultimate vectors (one meaning of lam)
    vals = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    xv = torch.cat([b[0] for b in dls.valid])
    d = (pooled_features(learn.model, xv) - pooled_features(source, xv)).abs().sum(1).mean()
    assert pooled_features(source, xv).shape == (len(xv), 512)
    assert abs(vals['valid_distill'] - 5e-3 * d.item()) <= 1e-4 * (1 + 5e-3 * d.item())


@pytest.mark.parametrize('arch,n_blocks,nf', [('inception_v3', 11, 2048), ('inception_resnet_v2', 7, 1536)])
def test_timm_inception(arch, n_blocks, nf):
    "timm's InceptionV3 and InceptionResnetV2 (the families of the adversarially trained `inception_v3.tf_adv_in1k` "
    "and `inception_resnet_v2.tf_ens_adv_in1k`): a stem, their blocks, timm's pool and the classifier, reproducing the "
    "forward; the head replaced; transfer with the cache on"
    set_seed(0)
    m = timm.create_model(arch, pretrained=False).eval()
    x = torch.rand(2, 3, 80, 80)   # both need 75 px at least
    mb = model_blocks(m)
    assert len(mb.blocks) == n_blocks
    with torch.no_grad(): torch.testing.assert_close(nn.Sequential(*mb.all)(x), m(x), rtol=0, atol=0)
    flat = [p for g in block_splitter(m) for p in g]
    assert len(flat) == len(set(map(id, flat))) and _ids(flat) == _ids(m.parameters())
    with torch.no_grad(): f0 = pooled_features(m, x)
    assert f0.shape == (2, nf)
    replace_head(m, 3)
    with torch.no_grad(): torch.testing.assert_close(pooled_features(m, x), f0, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.rand(12, 3, 80, 80, generator=g), torch.arange(12) % 2
    dls80 = task_dls(ArrayData(xs[:8], ys[:8], xs[8:], ys[8:], ['a', 'b'], 'synthetic'), bs=4, normalize=False)
    learn = transfer_learner(m, dls80, n_retrain=1)
    frozen0 = _frozen_state(learn.model, n_frozen_entries(learn.model, 1))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.feature_cache.active, learn.feature_cache.reason
    for k, v in _frozen_state(learn.model, n_frozen_entries(learn.model, 1)).items(): assert torch.equal(v, frozen0[k]), k
    if arch == 'inception_v3':
        with pytest.raises(TypeError, match='aux_logits=False'):
            model_blocks(timm.create_model('inception_v3', pretrained=False, aux_logits=True))


def test_input_stats_of_a_timm_model(digits_rgb32):
    "A timm model's `pretrained_cfg` gives `input_stats` (the README's `folder_dls(stats=input_stats(source))`), "
    "and data normalized otherwise are warned about, naming where the statistics come from."
    import warnings
    from fastai.vision.all import imagenet_stats
    from rtl_fastai.core import input_stats
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, depth=1)
    test_mean = input_stats(vit)[0].flatten().tolist()
    assert test_mean == [0.5, 0.5, 0.5]
    assert input_stats(timm.create_model('resnet18', pretrained=False))[0].flatten().tolist() == pytest.approx(imagenet_stats[0])
    assert input_stats(torchvision.models.resnet18()) is None   # torchvision models keep no statistics
    dls = task_dls(digits_rgb32, bs=16, normalize=False)
    from fastai.data.transforms import Normalize
    dls.add_tfms([Normalize.from_stats(*imagenet_stats)], 'after_batch')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        transfer_learner(vit, dls, n_retrain=0, cache=False)
    assert any("pretrained_cfg" in str(o.message) and 'mean=[0.5, 0.5, 0.5]' in str(o.message) for o in w), [str(o.message) for o in w]


def test_timm_weights_without_the_hub(tmp_path, monkeypatch):
    "Where the Hugging Face Hub cannot be reached, timm's weights come from its local cache at once, and weights not "
    "there fail at once, saying so (not after a minute of retries)."
    import huggingface_hub.constants as hc
    from safetensors.torch import save_file
    import rtl_fastai.job as job
    monkeypatch.setattr(hc, 'HF_HUB_OFFLINE', False)   # (an offline CI may set HF_HUB_OFFLINE=1)
    unreachable = job._unreachable
    for v in job._PROXY_VARS: monkeypatch.delenv(v, raising=False)
    assert unreachable('http://127.0.0.1:1')   # a refused connection
    monkeypatch.setenv('HTTPS_PROXY', 'http://proxy.invalid:3128')
    assert not unreachable('http://127.0.0.1:1')   # behind a proxy the host is not tried: the downloads go through it
    monkeypatch.setattr(hc, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(job, '_unreachable', lambda url, timeout=3.: True)
    ref = timm.create_model('resnet18', pretrained=False)
    repo = tmp_path/'models--timm--resnet18.a1_in1k'   # the Hub cache's layout: refs/main names the snapshot
    (repo/'snapshots'/('0'*40)).mkdir(parents=True)
    save_file(ref.state_dict(), repo/'snapshots'/('0'*40)/'model.safetensors')
    (repo/'refs').mkdir(); (repo/'refs'/'main').write_text('0'*40)
    m, st = job.build_arch('timm:resnet18', pretrained=True)
    torch.testing.assert_close(m.conv1.weight, ref.conv1.weight)
    assert not hc.HF_HUB_OFFLINE   # the offline mode was for that call only
    with pytest.raises(OSError, match='cannot be reached and the weights are not in its local cache'):
        job.build_arch('timm:resnet34', pretrained=True)
    assert not hc.HF_HUB_OFFLINE


def test_penultimate_before_timm_head_dropout():
    "A timm ViT with `drop_rate` drops out just before its head: the penultimate features are those before the dropout "
    "(as for the CNNs), the same in train and eval mode, bare or in `vision_learner`; not a random mask of them"
    from fastai.vision.learner import TimmBody
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, depth=1, drop_rate=0.5)
    body = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, depth=1, drop_rate=0.5, num_classes=0)
    wrapped = nn.Sequential(TimmBody(body, pretrained=False, cut=None), nn.Linear(192, 3))  # as `vision_learner` builds
    x = torch.rand(4, 3, 32, 32)
    for m in (vit, wrapped):
        p, got = penultimate(m), []
        h = p.module.register_forward_hook(lambda mod, i, o: got.append(p.hook_func(mod, i, o)))
        with torch.no_grad():
            m.train(); m(x)
            m.eval(); m(x)
        h.remove()
        torch.testing.assert_close(got[0], got[1])


def test_timm_checkpoint_into_vision_learner(tmp_path, dls):
    ("A timm model's own state dict (`conv1.weight`, ..., `fc.weight`) loads into fastai's `vision_learner` on that timm "
     "architecture (`0.model.conv1.weight`, ...: fastai's `TimmBody` without the classifier), the head kept; also "
     "through `transfer_learner(learn, dls, weights=...)`")
    from rtl_fastai.checkpoint import load_robust_checkpoint
    torch.manual_seed(0)
    ref = timm.create_model('resnet18', pretrained=False, num_classes=7)
    torch.save(ref.state_dict(), tmp_path/'timm_r18.pt')
    learn = vision_learner(dls, 'resnet18', pretrained=False, normalize=False)
    head = {k: v.clone() for k, v in learn.model.state_dict().items() if k.startswith('1.')}
    m = load_robust_checkpoint(learn.model, tmp_path/'timm_r18.pt')
    body = m[0].model.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith('fc.'): assert torch.equal(body[k], v), k
    for k, v in head.items(): assert torch.equal(m.state_dict()[k], v), k
    t = transfer_learner(vision_learner(dls, 'resnet18', pretrained=False, normalize=False), dls, n_retrain=1,
                         weights=tmp_path/'timm_r18.pt')
    assert torch.equal(t.model[0].model.conv1.weight, ref.conv1.weight)


def test_vision_learner_timm_convnext_blocks_hold_every_parameter(dls):
    ("fastai builds a timm ConvNeXt without classifier and runs `forward_features`: timm's head LayerNorm is never "
     "called but holds parameters; it goes with the stem, so `block_splitter` works and `transfer_learner` freezes it")
    from rtl_fastai.models import _check_partition
    learn = vision_learner(dls, 'convnext_atto', pretrained=False, normalize=False, splitter=block_splitter)
    _check_partition(learn.model, model_blocks(learn.model), 'test')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    tl = transfer_learner(learn, dls, n_retrain=0)
    assert not tl.model[0].model.head.norm.weight.requires_grad
    assert all(p.requires_grad == n.startswith('1.') for n, p in tl.model.named_parameters())


def test_vision_learner_on_torchvision_efficientnet_says_what_works(dls):
    "fastai cuts a torchvision EfficientNet to one `features` block: the error says so and what to give instead"
    learn = vision_learner(dls, torchvision.models.efficientnet_b0, pretrained=False, normalize=False)
    with pytest.raises(TypeError, match=r"vision_learner.*efficientnet_b0\(weights=\.\.\.\).*set_blocks"):
        model_blocks(learn.model)
    model_blocks(torchvision.models.efficientnet_b0())   # the architecture's own model is supported

def test_images_too_small_for_a_timm_model(dls):
    "timm's InceptionV3 on 32 px images (it needs 75 px at least): `transfer_learner` says the images are too small and "
    "the size the model was made for, itself and inside fastai's `vision_learner`"
    m = timm.create_model('inception_v3', pretrained=False)
    with pytest.raises(RuntimeError, match=r"too small for this model: it was made for 299x299 images, these are 32x32"):
        transfer_learner(m, dls)
    learn = vision_learner(dls, 'inception_v3', pretrained=False, normalize=False)
    with pytest.raises(RuntimeError, match=r"made for 299x299 images, these are 32x32.*Resize"):
        transfer_learner(learn, dls)
