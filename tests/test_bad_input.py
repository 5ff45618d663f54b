"""Bad input across the public API (issue 8, part 1).

One table: each row calls a public function with one bad argument and expects a clear error (or warning) whose
message names the parameter (or the file) and the fix. Every row runs with the working directory in a folder of
"user files" (checkpoints, data archives, earlier results): the test also checks that no file there was changed,
removed or added.
"""
import contextlib, hashlib, io, re
from pathlib import Path
import pytest
import torch
import torch.nn as nn
from fastai.learner import Learner
from rtl_fastai.data.all import (task_dls, load_dataset, load_digits_data, select_classes, subsample_valid, normalize_stats,
                             find_data, ArrayData, check_image_folder, folder_dls, make_image_folder)
from fastai.vision.core import PILImageBW
from rtl_fastai.models import SmallCNN, WideResNet, replace_head, freeze_blocks, model_blocks, set_blocks, penultimate
from rtl_fastai.attacks import pgd_attack, fgsm_attack, ThreatModel
from rtl_fastai.checkpoint import load_robust_checkpoint, extract_state_dict, CheckpointMismatchError, UnsafeCheckpointError
import rtl_fastai.checkpoint as _ck
from rtl_fastai.core import check_normalization
from rtl_fastai.callback.adv_valid import RobustAccuracy, robust_accuracy_curve, robust_validate
from rtl_fastai.experiment import fit_quietly
from rtl_fastai.callback.adv_train import PGDTraining, FreeAdvTraining, FastAdvTraining, TRADESTraining
from rtl_fastai.callback.transfer import transfer_learner, transfer_head
from rtl_fastai.callback.freeze import FreezeBlocks
from rtl_fastai.callback.distill import FeatureDistillation
from rtl_fastai.pipeline import make_model, next_run_dir, run_pipeline
from rtl_fastai.cli import main as cli_main
from rtl_fastai.job import transfer_job
from rtl_fastai.report import autoattack_evaluate, square_evaluate

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# the user's files
@pytest.fixture(scope='module')
def user_dir(tmp_path_factory):
    "A folder of files a user keeps: a good checkpoint, damaged ones, a data archive, earlier results."
    root = tmp_path_factory.mktemp('user')
    torch.manual_seed(0)
    torch.save(SmallCNN().state_dict(), root/'good.pth')
    (root/'garbage.pth').write_bytes(b'not a checkpoint' * 8)
    (root/'empty.pth').write_bytes(b'')
    b = (root/'good.pth').read_bytes(); (root/'truncated.pth').write_bytes(b[:len(b)//2])
    torch.save(nn.Linear(2, 2), root/'module.pth')  # a pickled module: unsafe to unpickle
    madry = {f'module.model.{k}': v for k, v in SmallCNN().state_dict().items()}
    madry.update({'module.normalizer.new_mean': torch.tensor([.5]), 'module.normalizer.new_std': torch.tensor([.25]),
                  **{f'module.attacker.model.{k}': v for k, v in SmallCNN().state_dict().items()}})
    torch.save(madry, root/'madry.pth')
    (root/'data').mkdir(); (root/'data'/'mnist_png.tgz').write_bytes(b'\x1f\x8b corrupt gzip')
    (root/'empty_data').mkdir()
    (root/'results.txt').write_text('my notes\n')
    (root/'out'/'run_001').mkdir(parents=True); (root/'out'/'run_001'/'results.json').write_text('{"kept": true}')
    # image folders in the usual train/valid layout: good, grayscale, one class, no validation split, empty, corrupt files
    make_image_folder(root/'images', n_per_class=4, n_valid=2, classes=2, size=16)
    make_image_folder(root/'gray_images', n_per_class=4, n_valid=2, classes=2, size=16, mode='L')
    make_image_folder(root/'one_class', n_per_class=4, n_valid=2, classes=1, size=16)
    make_image_folder(root/'no_valid', n_per_class=4, n_valid=2, classes=2, size=16, valid='val')
    for s in ('train', 'valid'): (root/'no_images'/s/'cat').mkdir(parents=True)
    (root/'no_images'/'train'/'cat'/'readme.txt').write_text('photos to come\n')
    make_image_folder(root/'corrupt_images', n_per_class=4, n_valid=2, classes=2, size=16)
    p = root/'corrupt_images'/'train'/'circle'/'0001.png'; p.write_bytes(p.read_bytes()[:40])
    return root


def snapshot(root:Path):
    "Every file (size, mtime, hash) and folder under `root`."
    res = {}
    for p in sorted(root.rglob('*')):
        rel = str(p.relative_to(root))
        if p.is_dir(): res[rel] = 'dir'
        else:
            st = p.stat()
            res[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return res


# ---------------------------------------------------------------------------------------------------------------
# helpers of the cases
def _x(dls): return dls.valid.one_batch()


def _pgd(dls, model, **kw):
    x, y = _x(dls)
    args = dict(eps=0.1, steps=2, stats=dls); args.update(kw)
    return pgd_attack(model, x, y, **args)


def _bad_download(payload):
    "Load a registry model whose download fails (an exception) or is cut short (bytes); the cache must stay empty."
    import tempfile
    cache = Path(tempfile.mkdtemp())
    def fake(url, dest):
        if isinstance(payload, Exception): raise payload
        Path(dest).write_bytes(payload)
    orig, _ck._download = _ck._download, fake
    try: load_robust_checkpoint('resnet18_l2_eps3', model_dir=cache)
    finally:
        _ck._download = orig
        assert list(cache.iterdir()) == [], 'a failed download left a file in the cache'


def _norm_dls(stats, c=1):
    from fastai.data.core import TfmdDL, DataLoaders
    from fastai.data.transforms import Normalize
    dl = TfmdDL([(torch.rand(c, 8, 8), 0)]*4, bs=2, after_batch=[Normalize.from_stats(*stats, cuda=False)] if stats else [])
    return DataLoaders(dl, dl)


def _expects(stats):
    m = SmallCNN(); m.input_stats = stats; return m


def _fit(learn, n=1):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, 1e-3)


def _cli(*args):
    "Run the CLI; an argparse exit (status 2) becomes a ValueError carrying its stderr."
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: cli_main(list(args))
        except SystemExit as e:
            if e.code not in (0, None): raise ValueError(f"exit {e.code}: {err.getvalue()}{'' if isinstance(e.code, int) else e.code}") from None


class _NaNAfter(nn.Module):
    "Cross-entropy that turns NaN from its `k`-th call on (a diverging training)."
    def __init__(self, k): super().__init__(); self.k, self.n = k, 0
    def forward(self, out, y):
        self.n += 1
        return nn.functional.cross_entropy(out, y) * (float('nan') if self.n >= self.k else 1.)


def _nan_fit(dls):
    learn = Learner(dls, SmallCNN(), loss_func=_NaNAfter(2), cbs=PGDTraining(0.1, steps=2))
    _fit(learn)


def _one_class(dls):
    return task_dls(load_digits_data(), classes=['5'])


def _empty_train():
    d = load_digits_data()
    return task_dls(ArrayData(d.x_train[:0], d.y_train[:0], d.x_valid, d.y_valid, d.classes))


def _fd_shapes(dls):
    learn = Learner(dls, SmallCNN(widths=(8, 16)), cbs=FeatureDistillation(SmallCNN(widths=(32, 64))))
    _fit(learn)


def _rgb_source_on_gray(dls):
    learn = transfer_learner(SmallCNN(n_in=3), dls, n_retrain=1)
    _fit(learn)


def _unsupported_model():
    return model_blocks(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))


def _tokens_in_no_block():
    "A model with a parameter outside every submodule (like a ViT's class token), declared without it."
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Linear(8, 10))
    m.cls_token = nn.Parameter(torch.zeros(8))
    set_blocks(m, stem=m[0], blocks=[], head=m[2])


class _TrainingStarted(Exception):
    "Raised by the patched `Learner.fit` of `_job`: the job got past its checks."


def _job(r, **kw):
    "`transfer_job` on the user's small folder with one bad input; it must fail before any training and write nothing."
    from fastai.learner import Learner as _L
    args = dict(data=str(r/'images'), source='torchvision:resnet18', pretrained=False, size=16, bs=4, epochs=1, steps=1,
                out=str(r/'job_out'), quiet=True)
    args.update(kw)
    orig = _L.fit
    def fit(*a, **k): raise _TrainingStarted()
    _L.fit = fit
    try: transfer_job(**args)
    except _TrainingStarted: raise AssertionError('transfer_job started training despite the bad input') from None
    finally:
        _L.fit = orig
        assert not (r/'job_out').exists(), 'transfer_job created its output folder before failing'


def _job_ok_until_training(r, **kw):
    "A job whose input is only warned about: it reaches training (stopped there) without writing anything."
    from fastai.learner import Learner as _L
    orig, started = _L.fit, []
    def fit(*a, **k): started.append(1); raise _TrainingStarted()
    _L.fit = fit
    try: transfer_job(**{**dict(data=str(r/'images'), source='torchvision:resnet18', pretrained=False, size=16, bs=4,
                                epochs=1, steps=1, out=str(r/'job_out'), quiet=True), **kw})
    except _TrainingStarted: pass
    finally:
        _L.fit = orig
        assert started and not (r/'job_out').exists()


def _job_cli(*args):
    "`rtl-fastai transfer` (the job's `main`); its exit with a message becomes a ValueError carrying it."
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: cli_main(['transfer', *args])
        except SystemExit as e:
            if e.code not in (0, None): raise ValueError(f"exit {e.code}: {err.getvalue()}{'' if isinstance(e.code, int) else e.code}") from None


# one row: (id, callable taking (dls, model, root), expected exception or warning class, regex the message must match)
E, W = 'error', 'warning'
CASES = [
    # -- attacks: eps / steps / alpha / norm / restarts out of range, bad tensors, a NaN loss
    ('pgd-eps-negative',   lambda d, m, r: _pgd(d, m, eps=-0.1), ValueError, r'`eps` must be a number >= 0'),
    ('pgd-eps-not-pixels', lambda d, m, r: _pgd(d, m, eps=8), ValueError, r'`eps`=8 .*8/255 not 8'),
    ('pgd-eps-nan',        lambda d, m, r: _pgd(d, m, eps=float('nan')), ValueError, r'`eps`'),
    ('pgd-steps-zero',     lambda d, m, r: _pgd(d, m, steps=0), ValueError, r'`steps` must be an integer >= 1'),
    ('pgd-steps-float',    lambda d, m, r: _pgd(d, m, steps=2.5), ValueError, r'`steps`'),
    ('pgd-alpha-zero',     lambda d, m, r: _pgd(d, m, alpha=0), ValueError, r'`alpha`.* must be > 0'),
    ('pgd-alpha-bool',     lambda d, m, r: _pgd(d, m, alpha=True), ValueError, r'`alpha`'),
    ('pgd-norm-unknown',   lambda d, m, r: _pgd(d, m, norm='l3'), ValueError, r"`norm` must be one of \('linf', 'l2'\)"),
    ('pgd-restarts-zero',  lambda d, m, r: _pgd(d, m, restarts=0), ValueError, r'`restarts`'),
    ('pgd-x-int',          lambda d, m, r: pgd_attack(m, torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.zeros(2, dtype=torch.long), 0.1),
                           TypeError, r'`x` must be a floating point tensor'),
    ('pgd-y-length',       lambda d, m, r: pgd_attack(m, _x(d)[0], _x(d)[1][:3], 0.1, stats=d), ValueError, r'`y` must be a tensor of \d+ labels'),
    ('pgd-loss-scalar',    lambda d, m, r: _pgd(d, m, loss_func=nn.CrossEntropyLoss()), ValueError, r'`loss_func` must return one loss per example'),
    ('pgd-loss-nan',       lambda d, m, r: _pgd(d, m, loss_func=lambda o, y: o.sum(1) * float('nan')), ValueError, r'`loss_func` returned \d+ non-finite'),
    ('pgd-stats-std-zero', lambda d, m, r: _pgd(d, m, stats=([0.5], [0.])), ValueError, r'std must be positive'),
    ('fgsm-eps-range',     lambda d, m, r: fgsm_attack(m, *_x(d), eps=2.), ValueError, r'`eps`=2.0 is larger than the whole \[0,1\] pixel range'),
    ('threat-eps-negative', lambda d, m, r: ThreatModel(-0.1), ValueError, r'`eps` must be a number >= 0'),
    ('threat-eps-not-pixels', lambda d, m, r: ThreatModel(8), ValueError, r'`eps`=8 .*8/255 not 8'),
    ('threat-eps-grey-levels', lambda d, m, r: ThreatModel(0.6), W, r'`eps`=0\.6 .*grey levels.*eps=0\.6/255'),
    ('threat-eps-one-warns', lambda d, m, r: _pgd(d, m, eps=1.), W, r'`eps`=1\.0 .*grey levels'),
    ('threat-steps-float', lambda d, m, r: ThreatModel(0.1, steps=2.5), ValueError, r'`steps` must be an integer >= 1'),
    ('threat-alpha-neg',   lambda d, m, r: ThreatModel(0.1, alpha=-1.), ValueError, r'`alpha`.* must be > 0'),
    ('threat-norm',        lambda d, m, r: ThreatModel(0.1, norm='L3'), ValueError, r"`norm` must be one of"),
    ('threat-restarts-bool', lambda d, m, r: ThreatModel(0.1, restarts=True), ValueError, r'`restarts`'),
    ('threat-random_start', lambda d, m, r: ThreatModel(0.1, random_start='yes'), ValueError, r'`random_start` must be True or False'),
    ('threat-unknown-field', lambda d, m, r: _pgd(d, m, step=3), TypeError, r"unexpected keyword argument.*'step'.*fields"),
    ('threat-eps-twice',   lambda d, m, r: pgd_attack(m, *_x(d), 0.1, eps=0.2), TypeError, r'^pgd_attack\(\) got the radius twice.*`eps`'),
    ('pgdtrain-no-eps',    lambda d, m, r: PGDTraining(), TypeError, r'PGDTraining needs the radius'),
    ('free-l2',            lambda d, m, r: FreeAdvTraining(0.1, norm='l2'), ValueError, r'L-inf attacks only.*`norm`'),
    ('fit-loss-turns-nan', lambda d, m, r: _nan_fit(d), ValueError, r"non-finite .*the model's outputs are nan/inf"),
    ('pgdtrain-stats-str', lambda d, m, r: PGDTraining(0.1, stats='imagenet'), TypeError, r"^PGDTraining: `stats`: normalize_stats: expected"),
    ('pgd-drop_fooled-str', lambda d, m, r: _pgd(d, m, drop_fooled='no'), TypeError, r"`drop_fooled` must be True or False, got 'no'"),
    ('fd-freeze_bn-str',   lambda d, m, r: FeatureDistillation(m, freeze_bn_stats='False'), TypeError, r"FeatureDistillation: `freeze_bn_stats` must be True or False"),
    ('fit_quietly-model',  lambda d, m, r: fit_quietly(m, 1, 1e-3), TypeError, r"fit_quietly: `learn` must be a fastai Learner, got SmallCNN: wrap the model"),
    ('fit_quietly-lr',     lambda d, m, r: fit_quietly(Learner(d, m), 1, -1.), ValueError, r"fit_quietly: `lr` must be a number > 0"),
    ('make_model-width0',  lambda d, m, r: make_model('smallcnn', 1, 10, width=0), ValueError, r"make_model: `width` must be an integer >= 1"),
    ('robust_validate-model', lambda d, m, r: robust_validate(m), TypeError, r"robust_validate: `learn` must be a fastai Learner, got SmallCNN"),
    ('arraydata-nhwc',     lambda d, m, r: ArrayData(torch.zeros(4, 8, 8, 1), torch.zeros(4, dtype=torch.long), torch.zeros(4, 1, 8, 8),
                                                    torch.zeros(4, dtype=torch.long), ['a', 'b']), ValueError, r"channels last \(NHWC\).*x.permute\(0, 3, 1, 2\)"),
    # -- validation callbacks and the report
    ('robacc-n_batches',   lambda d, m, r: RobustAccuracy(n_batches=0), ValueError, r'`n_batches` must be an integer >= 1'),
    ('robacc-norm',        lambda d, m, r: RobustAccuracy(norm='l1'), ValueError, r'`norm`'),
    ('robust_validate-eps', lambda d, m, r: Learner(d, m).robust_validate(eps=8, show_progress=False), ValueError, r'`eps`'),
    ('curve-empty-eps',    lambda d, m, r: robust_accuracy_curve(Learner(d, m), []), ValueError, r'`eps_list` is empty'),
    ('report-n_batches',   lambda d, m, r: Learner(d, m).robustness_report(n_batches=0), ValueError, r'`n_batches`'),
    ('report-tol',         lambda d, m, r: Learner(d, m).robustness_report(tol=-1), ValueError, r'`tol`'),
    ('autoattack-version', lambda d, m, r: autoattack_evaluate(Learner(d, m), version='fast'), ValueError, r'`version` must be one of'),
    ('autoattack-eps',     lambda d, m, r: autoattack_evaluate(Learner(d, m), eps=8), ValueError, r'`eps`'),
    ('square-queries',     lambda d, m, r: square_evaluate(Learner(d, m), n_queries=0), ValueError, r'`n_queries`'),
    # -- adversarial training callbacks
    ('pgdtrain-eps',       lambda d, m, r: PGDTraining(eps=8), ValueError, r'`eps`=8 .*pixel'),
    ('pgdtrain-steps',     lambda d, m, r: PGDTraining(0.1, steps=0), ValueError, r'`steps`'),
    ('free-replays',       lambda d, m, r: FreeAdvTraining(0.1, replays=0), ValueError, r'`replays`'),
    ('fast-alpha',         lambda d, m, r: FastAdvTraining(0.1, alpha=-1.), ValueError, r'`alpha`'),
    ('trades-beta',        lambda d, m, r: TRADESTraining(0.1, beta=-1), ValueError, r'`beta`'),
    # -- transfer: n_retrain out of range, unknown modes, mismatched inputs
    ('transfer-n_retrain-high', lambda d, m, r: transfer_learner(m, d, n_retrain=9), ValueError, r'`n_retrain` must be an integer in 0\.\.2'),
    ('transfer-n_retrain-neg',  lambda d, m, r: transfer_learner(m, d, n_retrain=-1), ValueError, r'`n_retrain`'),
    ('transfer-n_retrain-str',  lambda d, m, r: transfer_learner(m, d, n_retrain='last'), ValueError, r"`n_retrain`.*or 'all'"),
    ('transfer-cache-mode',     lambda d, m, r: transfer_learner(m, d, cache='yes'), ValueError, r'`mode` must be'),
    ('transfer-weights-mismatch', lambda d, m, r: transfer_learner(SmallCNN(widths=(8, 16)), d, weights=r/'good.pth'),
                                CheckpointMismatchError, r'transfer_learner: `weights`: the checkpoint does not match the model'),
    ('transfer-wrong-channels', lambda d, m, r: _rgb_source_on_gray(d), RuntimeError, r'expected input.* to have 3 channels, but got 1'),
    ('transfer-double-normalize', lambda d, m, r: transfer_learner(SmallCNN(stats=([.5], [.25])), d), W,
                                r'transfer_learner: the inputs are normalized twice.*Remove `Normalize`'),
    ('freezeblocks-neg',   lambda d, m, r: FreezeBlocks(-1), ValueError, r'`n_frozen` must be an integer >= 0'),
    ('freeze_blocks-high', lambda d, m, r: freeze_blocks(SmallCNN(), 99), ValueError, r'`n_frozen` must be an integer in \[0, 5\]'),
    ('transfer_head-pdrop', lambda d, m, r: transfer_head(64, 5, (32,), p_drop=1.), ValueError, r'`p_drop`'),
    # -- distillation: unknown layer names, mismatched feature shapes
    ('distill-layer-unknown', lambda d, m, r: FeatureDistillation(SmallCNN(), layer='blok2'), ValueError,
                              r"`layer`='blok2' is not a module of the source model\. Did you mean 'block2'"),
    ('distill-layer-type', lambda d, m, r: FeatureDistillation(SmallCNN(), layer=3), TypeError, r'`layer` must be None'),
    ('distill-lam',        lambda d, m, r: FeatureDistillation(SmallCNN(), lam=-1), ValueError, r'`lam` must be a number >= 0'),
    ('distill-penalty',    lambda d, m, r: FeatureDistillation(SmallCNN(), penalty='cos'), ValueError,
     r"`penalty` must be 'l1', 'l2' or a function"),
    ('distill-warmup',     lambda d, m, r: FeatureDistillation(SmallCNN(), warmup_epochs=-1), ValueError, r'`warmup_epochs`'),
    ('distill-source',     lambda d, m, r: FeatureDistillation('resnet18'), TypeError, r'`source` must be an nn\.Module'),
    ('distill-feature-shapes', lambda d, m, r: _fd_shapes(d), ValueError, r'features of shape \(16,\).*source model has \(64,\).*`layer=`'),
    # -- models
    ('smallcnn-n_in',      lambda d, m, r: SmallCNN(n_in=0), ValueError, r'`?n_in`?'),
    ('wrn-depth',          lambda d, m, r: WideResNet(depth=27), ValueError, r'invalid `depth`=27'),
    ('replace_head-n_out', lambda d, m, r: replace_head(SmallCNN(), 0), ValueError, r'`?n_out`?'),
    ('model_blocks-unknown', lambda d, m, r: _unsupported_model(), TypeError, r'unsupported model Sequential.*set_blocks'),
    ('set_blocks-missing', lambda d, m, r: _tokens_in_no_block(), ValueError, r'in no block: cls_token, 1\.weight, 1\.bias\. .*`Stage`'),
    ('replace_head-kwargs', lambda d, m, r: replace_head(SmallCNN(), 3, lin_ftrs=[8]), TypeError, r'`head_kwargs`.*only apply to fastai heads'),
    ('penultimate-unknown', lambda d, m, r: penultimate(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))), TypeError, r'unsupported model Sequential.*set_blocks'),
    ('make_model-arch',    lambda d, m, r: make_model('vgg', 1, 10), ValueError, r'`arch` must be one of'),
    # -- data: empty or one-class datasets, wrong image size, missing or corrupt data paths
    ('data-one-class',     lambda d, m, r: _one_class(d), ValueError, r'at least 2 classes.*`classes`'),
    ('data-empty-train',   lambda d, m, r: _empty_train(), ValueError, r'training set has 0 examples'),
    ('data-classes-empty', lambda d, m, r: select_classes(load_digits_data(), []), ValueError, r'classes is empty'),
    ('data-class-unknown', lambda d, m, r: select_classes(load_digits_data(), ['cat']), ValueError, r"unknown class 'cat'"),
    ('data-n_per_class',   lambda d, m, r: task_dls('digits', n_per_class=10_000), ValueError, r'fewer than n_per_class=10000'),
    ('data-valid-n_per_class', lambda d, m, r: subsample_valid(load_digits_data(), 10_000), ValueError, r'validation examples, fewer than n_per_class=10000'),
    ('data-valid-n_per_class-type', lambda d, m, r: subsample_valid(load_digits_data(), 2.5), ValueError, r'`n_per_class` must be an integer >= 1, got 2.5'),
    ('data-bs',            lambda d, m, r: task_dls('digits', bs=0), ValueError, r'task_dls: `bs` must be an integer >= 1, got 0'),
    ('data-augment-size',  lambda d, m, r: task_dls('digits', augment=True), ValueError, r'augment=True is for 32x32 images.*\(8, 8\)'),
    ('data-valid_pct',     lambda d, m, r: load_digits_data(valid_pct=1.5), ValueError, r'valid_pct'),
    ('data-stats-channels', lambda d, m, r: normalize_stats(([.1, .2, .3], [.1, .2])), ValueError, r'mean has 3 channels and std 2'),
    ('data-path-missing',  lambda d, m, r: load_dataset(str(r/'no_such_folder')), FileNotFoundError, r'neither a dataset name .* nor an existing path'),
    ('data-mnist-path-missing', lambda d, m, r: load_dataset('mnist', path=r/'nowhere'), FileNotFoundError, r'data path .*nowhere does not exist'),
    ('data-archive-corrupt', lambda d, m, r: find_data('mnist', path=r/'data'/'mnist_png.tgz'), ValueError, r'cannot read archive .*mnist_png\.tgz'),
    ('data-folder-wrong',  lambda d, m, r: load_dataset('mnist', path=r/'empty_data'), ValueError, r'does not hold mnist.*mnist_png/training'),
    ('digits-with-path',   lambda d, m, r: load_dataset('digits', path=r/'data'), ValueError, r"'digits' is embedded .*takes no path"),
    # -- the user's own image folder (issue 12)
    ('folder-missing',     lambda d, m, r: check_image_folder(r/'my_photos'), FileNotFoundError, r"`path`=.*my_photos' does not exist"),
    ('folder-is-file',     lambda d, m, r: check_image_folder(r/'results.txt'), NotADirectoryError, r'`path`=.*results\.txt.* is a file'),
    ('folder-no-valid',    lambda d, m, r: check_image_folder(r/'no_valid'), ValueError,
                           r"no 'valid' folder; the expected layout is path/train/<class>/.*found subfolders \['train', 'val'\]\. .*`valid='val'`"),
    ('folder-no-images',   lambda d, m, r: check_image_folder(r/'no_images'), ValueError,
                           r"no image files under .*train \(`train`='train'\); .*\.jpg .*`image_extensions`; found other files: \{'\.txt': 1\}"),
    ('folder-one-class',   lambda d, m, r: check_image_folder(r/'one_class'), ValueError, r'a classifier needs images of at least 2 classes'),
    ('folder-unreadable',  lambda d, m, r: check_image_folder(r/'corrupt_images'), ValueError,
                           r'1 of 12 image files .* cannot be read \(train/circle/0001\.png\); remove them, e\.g\. .*verify_images'),
    ('folder-dls-unreadable', lambda d, m, r: folder_dls(r/'corrupt_images', bs=4), ValueError, r'cannot be read'),
    ('folder-dls-stats-channels', lambda d, m, r: folder_dls(r/'gray_images', size=8, bs=4, device='cpu', img_cls=PILImageBW), ValueError,
                           r'`stats` has 3 channels but the images are decoded with 1.*give 1-channel statistics'),
    ('folder-dls-stats-2ch', lambda d, m, r: folder_dls(r/'images', size=8, bs=4, stats=([.5, .5], [.2, .2]), device='cpu'), ValueError,
                           r'`stats` has 2 channels but the images are decoded with 3'),
    ('folder-dls-size',    lambda d, m, r: folder_dls(r/'images', size=0), ValueError, r'folder_dls: `size` must be a positive integer'),
    ('folder-dls-method',  lambda d, m, r: folder_dls(r/'images', method='stretch'), ValueError, r"`method` must be one of \('squish', 'pad', 'crop'\)"),
    ('folder-dls-bs',      lambda d, m, r: folder_dls(r/'images', size=8), ValueError, r'`bs`=64 is larger than the 8 training images'),
    # -- checkpoints: mismatched, missing, corrupt, unsafe
    ('ckpt-mismatch',      lambda d, m, r: load_robust_checkpoint(SmallCNN(n_out=5), r/'good.pth'), CheckpointMismatchError,
                           r'does not match the model \(nothing was loaded\).*head\.weight: checkpoint \(10, 64\) vs model \(5, 64\)'),
    ('ckpt-missing',       lambda d, m, r: load_robust_checkpoint(SmallCNN(), r/'nope.pth'), FileNotFoundError, r'`path_or_url`: no checkpoint file'),
    ('ckpt-garbage',       lambda d, m, r: load_robust_checkpoint(SmallCNN(), r/'garbage.pth'), ValueError, r'`path_or_url`: .*garbage\.pth is not a readable torch checkpoint'),
    ('ckpt-truncated',     lambda d, m, r: load_robust_checkpoint(SmallCNN(), r/'truncated.pth'), ValueError, r'`path_or_url`: .*truncated\.pth is not a readable'),
    ('ckpt-empty',         lambda d, m, r: load_robust_checkpoint(SmallCNN(), r/'empty.pth'), ValueError, r'`path_or_url`: .*empty\.pth is not a readable'),
    ('ckpt-unsafe',        lambda d, m, r: load_robust_checkpoint(SmallCNN(), r/'module.pth'), UnsafeCheckpointError, r'refused to unpickle .*module\.pth'),
    ('ckpt-key',           lambda d, m, r: extract_state_dict({'net': {}}, key='model'), KeyError, r"`key`='model' is not in the checkpoint"),
    ('ckpt-url-scheme',    lambda d, m, r: load_robust_checkpoint(SmallCNN(), 's3://bucket/x.pth'), ValueError, r"`path_or_url`: unsupported URL scheme 's3'"),
    ('ckpt-madry-no-normalize', lambda d, m, r: load_robust_checkpoint(SmallCNN(), r/'madry.pth'), W, r'no NormalizeInput layer'),
    ('ckpt-unknown-name',  lambda d, m, r: load_robust_checkpoint('resnet50_l2_eps4'), ValueError,
                           r"`model`: unknown robust model 'resnet50_l2_eps4'; did you mean 'resnet50_l2_eps5'.*robust_models\(\)"),
    ('ckpt-unknown-source', lambda d, m, r: load_robust_checkpoint(SmallCNN(), 'Salman2020Do_R1'), ValueError,
                           r"`path_or_url`: 'Salman2020Do_R1' is neither a checkpoint file nor a registered model.*'Salman2020Do_R18'"),
    ('ckpt-download-fails', lambda d, m, r: _bad_download(ConnectionError('network unreachable')), OSError,
                           r"the published model 'resnet18_l2_eps3' is not in the cache: downloading https://huggingface.co/.*resnet18_l2_eps3.ckpt failed .*nothing was kept in the cache.*Offline\? Fetch"),
    ('ckpt-download-truncated', lambda d, m, r: _bad_download((r/'good.pth').read_bytes()[:300]), ValueError,
                           r'`path_or_url`: the file downloaded from .* is not a readable checkpoint .*nothing was kept in the cache'),
    ('ckpt-stats-channels', lambda d, m, r: load_robust_checkpoint(SmallCNN(), r/'good.pth', stats=([.5]*3, [.2]*3)),
                           CheckpointMismatchError, r'the input statistics \(`stats`\) have 3 channels .*first convolution takes 1-channel images'),
    ('ckpt-norm',          lambda d, m, r: load_robust_checkpoint(SmallCNN(), r/'madry.pth', normalize='inside'), ValueError, r"`normalize` must be 'auto', 'model' or 'dls'"),
    ('norm-dls-channels',  lambda d, m, r: check_normalization(SmallCNN(), _norm_dls(([.5]*3, [.2]*3)), 'transfer_learner'), ValueError,
                           r'transfer_learner: the `dls` normalize 3 channels .*first convolution takes 1-channel.*one value per channel'),
    ('norm-missing',       lambda d, m, r: check_normalization(_expects((.5, .25)), _norm_dls(None), 'RobustAccuracy'), W,
                           r'RobustAccuracy: the model expects inputs normalized with mean=\[0.5\].*do not normalize.*Normalize.from_stats'),
    # -- pipeline and command line
    ('pipeline-arch',      lambda d, m, r: run_pipeline(arch='vgg', log=None), ValueError, r'`arch` must be one of'),
    ('run-dir-is-file',    lambda d, m, r: next_run_dir(r/'results.txt'), NotADirectoryError, r'`out`=.*results\.txt.* is a file'),
    ('cli-eps',            lambda d, m, r: _cli('run', '--eps', '8'), ValueError, r"--eps: `eps`='8' is larger than the whole \[0,1\] pixel range.*'8/255'"),
    ('cli-steps',          lambda d, m, r: _cli('run', '--steps', '0'), ValueError, r'--steps: must be >= 1'),
    ('cli-classes',        lambda d, m, r: _cli('run', '--source-classes', ','), ValueError, r'class list is empty'),
    ('cli-out-is-file',    lambda d, m, r: _cli('run', '--out', str(r/'results.txt')), ValueError, r'--out.*results\.txt.* is a file'),
    # -- the user's own transfer job (`rtl-fastai transfer`, issue 12): every bad input fails before any training
    ('job-folder-missing', lambda d, m, r: _job(r, data=str(r/'my_photos')), FileNotFoundError,
                           r"transfer_job: `data`: '.*my_photos' does not exist"),
    ('job-folder-one-class', lambda d, m, r: _job(r, data=str(r/'one_class')), ValueError,
                           r'transfer_job: `data`: a classifier needs images of at least 2 classes'),
    ('job-folder-unreadable', lambda d, m, r: _job(r, data=str(r/'corrupt_images')), ValueError,
                           r'transfer_job: `data`: 1 of 12 image files .* cannot be read'),
    ('job-unknown-name',   lambda d, m, r: _job(r, source='resnet18_linf_eps4'), ValueError,
                           r"transfer_job: `source`: unknown robust model 'resnet18_linf_eps4'; did you mean 'resnet18_linf_eps4.0'.*robust_models\(\)"),
    ('job-torchvision-name', lambda d, m, r: _job(r, source='resnet18'), ValueError, r"write 'torchvision:resnet18'"),
    ('job-natural-unknown', lambda d, m, r: _job(r, source='torchvision:resnet19'), ValueError,
                           r"`source`='torchvision:resnet19' is not a torchvision classification model; did you mean 'resnet18'"),
    ('job-ckpt-missing',   lambda d, m, r: _job(r, source=str(r/'nope.ckpt'), arch='resnet18'), FileNotFoundError,
                           r'transfer_job: `source`: no checkpoint file at .*nope\.ckpt'),
    ('job-ckpt-no-arch',   lambda d, m, r: _job(r, source=str(r/'madry.pth')), ValueError,
                           r"`arch` is missing: a checkpoint file needs its architecture, e.g. arch='resnet50'"),
    ('job-ckpt-wrong-arch', lambda d, m, r: _job(r, source=str(r/'madry.pth'), arch='resnet18'), CheckpointMismatchError,
                           r"transfer_job: `source` madry\.pth is not a checkpoint of `arch`='resnet18'.*does not match the model \(nothing was loaded\)"),
    ('job-ckpt-garbage',   lambda d, m, r: _job(r, source=str(r/'garbage.pth'), arch='resnet18'), ValueError,
                           r'`source`: .*garbage\.pth is not a readable torch checkpoint'),
    ('job-ckpt-no-stats',  lambda d, m, r: _job(r, source=str(r/'good.pth'), arch='resnet18'), ValueError,
                           r"`stats`: the checkpoint good\.pth stores no input statistics; .*stats='imagenet'"),
    ('job-n_retrain-word', lambda d, m, r: _job(r, n_retrain='last'), ValueError, r"`n_retrain` must be a number of blocks .* or 'all'"),
    ('job-n_retrain-high', lambda d, m, r: _job(r, n_retrain='7'), ValueError, r'transfer_job: `n_retrain` must be an integer in 0\.\.4'),
    ('job-lam-frozen',     lambda d, m, r: _job(r, lam=5e-3), ValueError, r"`lam`=0\.005 has no effect with `n_retrain`=0.*n_retrain='all'"),
    ('job-eps-8',          lambda d, m, r: _job(r, eps='8'), ValueError, r"`eps`='8' is larger than the whole \[0,1\] pixel range.*'8/255'"),
    ('job-eps-half',       lambda d, m, r: _job_ok_until_training(r, eps='0.5'), W, r'`eps`=0\.5 .*grey levels'),
    ('job-eps-text',       lambda d, m, r: _job(r, eps='4/25S'), ValueError, r"`eps`='4/25S' is not a number"),
    ('job-steps-zero',     lambda d, m, r: _job(r, steps=0), ValueError, r'transfer_job: `steps` must be an integer >= 1'),
    ('job-norm',           lambda d, m, r: _job(r, norm='L3'), ValueError, r"`norm` must be 'linf' or 'l2'"),
    ('job-normalize',      lambda d, m, r: _job(r, normalize='both'), ValueError, r"`normalize` must be 'dls'.* or 'model'"),
    ('job-stats-text',     lambda d, m, r: _job(r, stats='0.5,0.5'), ValueError, r"`stats`='0\.5,0\.5' is not 'imagenet'"),
    ('job-bs-too-large',   lambda d, m, r: _job(r, bs=64), ValueError, r'`bs`=64 is larger than the 8 training images'),
    ('job-out-is-file',    lambda d, m, r: _job(r, out=str(r/'results.txt')), NotADirectoryError, r'transfer_job: `out`=.*results\.txt.* is a file'),
    ('job-cli-eps',        lambda d, m, r: _job_cli(str(r/'images'), '--eps', '8', '--out', str(r/'job_out')), ValueError,
                           r"exit rtl-fastai transfer: `--eps 8` is larger"),
    ('job-cli-folder',     lambda d, m, r: _job_cli(str(r/'no_images'), '--source', 'torchvision:resnet18', '--no-pretrained'),
                           ValueError, r'exit rtl-fastai transfer: `data`: no image files under'),
]


def test_enough_cases():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, digits_dls, digits_model, user_dir, monkeypatch):
    name, fn, exc, pattern = case
    monkeypatch.chdir(user_dir)  # anything written to the working directory would show in the snapshot
    model = SmallCNN(); model.load_state_dict(digits_model.state_dict()); model.eval()
    before = snapshot(user_dir)
    if exc == W:
        with pytest.warns(UserWarning, match=re.compile(pattern, re.S)): fn(digits_dls, model, user_dir)
    else:
        with pytest.raises(exc) as ei: fn(digits_dls, model, user_dir)
        assert re.search(pattern, str(ei.value), re.S), f"{name}: the message does not match {pattern!r}:\n{ei.value}"
    assert snapshot(user_dir) == before, f"{name}: a user file was changed, removed or added"


def test_mismatched_checkpoint_loads_nothing(user_dir):
    "A checkpoint that does not fit leaves the model's weights exactly as they were."
    m = SmallCNN(n_out=5)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointMismatchError): load_robust_checkpoint(m, user_dir/'good.pth')
    for k, v in m.state_dict().items(): assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize('kw,err,msg', [
    (dict(val_bs=0), ValueError, "`val_bs` must be an integer >= 1 or None, got 0"),
    (dict(val_bs=2.5), ValueError, "`val_bs` must be an integer"),
    (dict(seed='a'), ValueError, "`seed` must be an integer"),
    (dict(device='gpu'), ValueError, "task_dls: `device`='gpu' is not a torch device"),
    (dict(data=None), TypeError, "the data must be a name"),
])
def test_task_dls_names_the_bad_argument(kw, err, msg):
    "Bad `task_dls` arguments fail before the data are loaded, naming the parameter (`val_bs=0` became 2*bs silently)"
    with pytest.raises(err, match=re.escape(msg)): task_dls(**{'data': 'digits', **kw})


def test_small_bad_inputs_named():
    "A function as the model, an unknown TRADES reduction, a NaN cache size: errors that name them"
    from rtl_fastai.callback.adv_train import trades_kl
    from rtl_fastai.callback.feature_cache import FeatureCache
    with pytest.raises(TypeError, match=r"`model` must be an nn\.Module"):
        pgd_attack(lambda t: t.flatten(1), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), eps=0.1)
    with pytest.raises(ValueError, match=r"`reduction` must be 'batchmean' or 'none'"):
        trades_kl(torch.rand(2, 3), torch.rand(2, 3), 'sum')
    with pytest.raises(ValueError, match=r"`max_mb` must be a number >= 0, got nan"): FeatureCache(max_mb=float('nan'))
