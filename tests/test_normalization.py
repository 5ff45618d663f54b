"Every entry point that has a model with known input statistics and DataLoaders warns once about a missing or doubled normalization."
import warnings
import pytest
import torch
from fastai.learner import Learner
from fastai.data.transforms import Normalize
from fastai.torch_core import set_seed
from rtl_fastai.data.all import ArrayData, task_dls
from rtl_fastai.models import SmallCNN
from rtl_fastai.core import input_stats
from rtl_fastai.checkpoint import load_robust_checkpoint
from rtl_fastai.callback.adv_valid import RobustAccuracy, robust_validate  # noqa: F401  (Learner.robust_validate)
from rtl_fastai.callback.adv_train import PGDTraining, FreeAdvTraining, FastAdvTraining, TRADESTraining
from rtl_fastai.callback.transfer import transfer_learner

torch.set_num_threads(1)
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

def _dls(stats=None):
    "A tiny 3-channel 2-class task (8 train, 8 valid); `stats`: fastai's `Normalize` in every loader's `after_batch`."
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.arange(16) % 2
    d = task_dls(ArrayData(x[:8], y[:8], x[8:], y[8:], ['a', 'b'], 'synthetic'), bs=4, normalize=False)
    if stats is not None:
        for dl in d.loaders: dl.after_batch.add(Normalize.from_stats(*stats, cuda=False))
    return d

def _expects_imagenet():
    "A model that expects ImageNet-normalized inputs, as `load_robust_checkpoint(..., normalize='dls')` leaves it."
    set_seed(0)
    m = SmallCNN(n_in=3, n_out=2, widths=(8, 16))
    m.input_stats = IMAGENET
    return m

def _normalizes_inside():
    set_seed(0)
    return SmallCNN(n_in=3, n_out=2, widths=(8, 16), stats=IMAGENET)

def _run(entry, model, dls):
    "Run the entry point `entry` (its fit or call); the messages of the warnings that name it."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        if entry == 'transfer_learner': transfer_learner(model, dls, cache=False)
        elif entry == 'robust_validate':
            learn = Learner(dls, model)
            for _ in range(2): learn.robust_validate(eps=2/255, steps=2, show_progress=False)
        else:
            cb = dict(RobustAccuracy=None, PGDTraining=lambda: PGDTraining(2/255, steps=2),
                      FreeAdvTraining=lambda: FreeAdvTraining(2/255, replays=2),
                      FastAdvTraining=lambda: FastAdvTraining(2/255), TRADESTraining=lambda: TRADESTraining(2/255, steps=2))[entry]
            mets = [RobustAccuracy(2/255, steps=2)] if entry == 'RobustAccuracy' else []
            learn = Learner(dls, model, metrics=mets, cbs=[] if cb is None else [cb()])
            with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)  # two epochs, many batches: one warning
    return [str(x.message) for x in w if str(x.message).startswith(f'{entry}:')]

ENTRIES = ['transfer_learner', 'RobustAccuracy', 'robust_validate', 'PGDTraining', 'FreeAdvTraining', 'FastAdvTraining',
           'TRADESTraining']

@pytest.mark.parametrize('entry', ENTRIES)
def test_missing_normalization_warned_once(entry):
    msgs = _run(entry, _expects_imagenet(), _dls())
    assert len(msgs) == 1, msgs
    assert 'mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]' in msgs[0] and 'the `dls` do not normalize' in msgs[0]

@pytest.mark.parametrize('entry', ENTRIES)
def test_double_normalization_warned_once(entry):
    msgs = _run(entry, _normalizes_inside(), _dls(IMAGENET))
    assert len(msgs) == 1, msgs
    assert 'normalized twice' in msgs[0] and 'mean=[0.485' in msgs[0]

@pytest.mark.parametrize('entry', ENTRIES)
def test_correct_setups_are_silent(entry):
    assert _run(entry, _expects_imagenet(), _dls(IMAGENET)) == []   # the DataLoaders normalize as the model expects
    assert _run(entry, _normalizes_inside(), _dls()) == []          # the model normalizes, the DataLoaders do not

def test_other_statistics_name_both():
    msgs = _run('robust_validate', _expects_imagenet(), _dls(([0.5]*3, [0.5]*3)))
    assert len(msgs) == 1 and 'mean=[0.485' in msgs[0] and 'normalize with mean=[0.5, 0.5, 0.5]' in msgs[0], msgs

def test_loaded_checkpoint_statistics(tmp_path):
    "A checkpoint with stored statistics, loaded with normalize='dls' (or through `weights=`): the entry points know them."
    m = _expects_imagenet()
    del m.input_stats
    torch.save({'state_dict': {**{f'model.{k}': v for k, v in m.state_dict().items()},
                               'normalize.mean': torch.tensor(IMAGENET[0]).view(1, 3, 1, 1),
                               'normalize.std': torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)}}, tmp_path/'rb.pt')
    loaded = load_robust_checkpoint(SmallCNN(n_in=3, n_out=2, widths=(8, 16)), tmp_path/'rb.pt', normalize='dls')
    torch.testing.assert_close(input_stats(loaded)[0].flatten(), torch.tensor(IMAGENET[0]))
    assert len(_run('robust_validate', loaded, _dls())) == 1
    # `weights=`: the same loader; the statistics go to the copy, and one warning (transfer_learner's) names them
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn = transfer_learner(SmallCNN(n_in=3, n_out=2, widths=(8, 16)), _dls(), weights=tmp_path/'rb.pt', cache=False)
    msgs = [str(x.message) for x in w if 'mean=[0.485' in str(x.message)]
    assert len(msgs) == 1 and msgs[0].startswith('transfer_learner:'), msgs
    torch.testing.assert_close(input_stats(learn.model)[1].flatten(), torch.tensor(IMAGENET[1]))
    # into a model that normalizes inside: the stored statistics fill its layer, and DataLoaders without Normalize are right
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn = transfer_learner(SmallCNN(n_in=3, n_out=2, widths=(8, 16), stats=([0.]*3, [1.]*3)), _dls(),
                                 weights=tmp_path/'rb.pt', cache=False)
    assert not [x for x in w if 'normaliz' in str(x.message)], [str(x.message) for x in w]
    torch.testing.assert_close(input_stats(learn.model)[0].flatten(), torch.tensor(IMAGENET[0]))

@pytest.mark.parametrize('norm', ['dls', 'model'])
def test_vision_learner_keeps_what_the_inputs_need(tmp_path, norm):
    "`vision_learner` keeps only the children of the model its `arch` returns: the loaded statistics must survive that"
    import torchvision
    from fastai.vision.learner import vision_learner
    src = torchvision.models.resnet18(weights=None)
    torch.save({'state_dict': {**{f'model.{k}': v for k, v in src.state_dict().items()},
                               'normalize.mean': torch.tensor(IMAGENET[0]).view(1, 3, 1, 1),
                               'normalize.std': torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)}}, tmp_path/'rb.pt')
    def robust_resnet18(pretrained=False, **kwargs):
        return load_robust_checkpoint(torchvision.models.resnet18(weights=None), tmp_path/'rb.pt', normalize=norm)
    learn = vision_learner(_dls(), robust_resnet18, pretrained=False)
    torch.testing.assert_close(input_stats(learn.model)[0].flatten(), torch.tensor(IMAGENET[0]))
    msgs = _run('robust_validate', learn.model, _dls())   # a `normalize='model'` normalization is lost with the cut: warned
    assert len(msgs) == 1 and 'do not normalize' in msgs[0] and 'vision_learner' in msgs[0], msgs
    assert not _run('transfer_learner', learn, _dls(IMAGENET))   # the tutorial's route: Normalize in the DataLoaders

def test_models_that_contain_a_normalizing_model():
    "A model in front (first child) that normalizes itself, a wrapper, a class attribute: read as what they are"
    import torchvision
    from rtl_fastai.core import add_input_norm
    inside = lambda: add_input_norm(SmallCNN(n_in=3, n_out=2, widths=(8, 16)), IMAGENET)
    for model in (torch.nn.Sequential(inside(), torch.nn.Softmax(-1)), add_input_norm(torch.nn.DataParallel(
                  SmallCNN(n_in=3, n_out=2, widths=(8, 16))), IMAGENET)):
        assert not _run('robust_validate', model, _dls())                  # [0,1] inputs are right
        assert 'twice' in _run('robust_validate', model, _dls(IMAGENET))[0]
    tv_norm = torch.nn.Sequential(torchvision.transforms.Normalize(*IMAGENET), _expects_imagenet())
    # a normalization layer in front that is not ours is read as the model's own, like a `NormalizeInput`
    torch.testing.assert_close(input_stats(tv_norm)[1].flatten(), torch.tensor(IMAGENET[1]))
    assert not _run('robust_validate', tv_norm, _dls())
    assert 'normalizes inside (Normalize,' in _run('robust_validate', tv_norm, _dls(IMAGENET))[0]
    class Net(SmallCNN): input_stats = IMAGENET
    torch.testing.assert_close(input_stats(Net(n_in=3, n_out=2, widths=(8, 16)))[0].flatten(), torch.tensor(IMAGENET[0]))
