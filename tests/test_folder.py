"""Tests of `rtl_fastai.data.folder`: the user's own image folder (`check_image_folder`, `folder_dls`) and the small
folders written for tests and tutorials (`make_image_folder`, `save_image_folder`); `random_tfms` on fastai's `Resize`."""
from pathlib import Path
import re, shutil, warnings
from collections import Counter

import pytest
import torch
from PIL import Image
from fastai.learner import Learner
from fastai.vision.core import PILImageBW, imagenet_stats

from rtl_fastai.core import normalize_stats
from rtl_fastai.data.all import (check_image_folder, folder_dls, make_image_folder, save_image_folder, load_digits_data,
                                 random_tfms, find_data, select_classes, subsample_valid)
from rtl_fastai.models import SmallCNN
from rtl_fastai.callback.transfer import transfer_learner, FeatureCache

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    "A synthetic 3-class RGB folder: 8 training and 4 validation 24x24 PNG images per class."
    return make_image_folder(tmp_path_factory.mktemp('f')/'shapes', n_per_class=8, n_valid=4, size=24)


def _fails(fn, exc, pattern):
    with pytest.raises(exc) as ei: fn()
    assert re.search(pattern, str(ei.value), re.S), f"message does not match {pattern!r}:\n{ei.value}"
    return str(ei.value)


# ---------------------------------------------------------------------------------------------------------------
# writing folders
def test_make_image_folder(tmp_path):
    f = make_image_folder(tmp_path/'a', n_per_class=3, n_valid=2, classes=['ring', 'cross'], size=(20, 30), ext='.jpg', mode='L')
    assert sorted(p.relative_to(f).as_posix() for p in f.rglob('*.jpg'))[:3] == ['train/cross/0000.jpg', 'train/cross/0001.jpg',
                                                                                  'train/cross/0002.jpg']
    assert len(list(f.rglob('*.jpg'))) == 10
    im = Image.open(f/'valid'/'ring'/'0001.jpg')
    assert (im.size, im.mode) == ((30, 20), 'L')
    g = make_image_folder(tmp_path/'b', n_per_class=3, n_valid=2, classes=['ring', 'cross'], size=(20, 30), ext='.jpg', mode='L')
    assert all((f/p).read_bytes() == (g/p).read_bytes() for p in ('train/ring/0002.jpg', 'valid/cross/0000.jpg'))
    h = make_image_folder(tmp_path/'c', n_per_class=3, n_valid=2, classes=['ring', 'cross'], size=(20, 30), ext='.jpg', mode='L', seed=1)
    assert (h/'train/ring/0002.jpg').read_bytes() != (f/'train/ring/0002.jpg').read_bytes()


def test_make_image_folder_never_overwrites(tmp_path):
    f = make_image_folder(tmp_path/'a', n_per_class=1, n_valid=1, classes=2)
    before = {p: p.read_bytes() for p in f.rglob('*.png')}
    _fails(lambda: make_image_folder(f), FileExistsError, r'`dest`=.* is not empty')
    assert {p: p.read_bytes() for p in f.rglob('*.png')} == before
    (tmp_path/'file').write_text('x')
    _fails(lambda: make_image_folder(tmp_path/'file'), NotADirectoryError, r'`dest`=.* is a file')
    _fails(lambda: make_image_folder(tmp_path/'x', classes=6), ValueError, r'`classes` must be an integer >= 1 and <= 5, got 6')
    _fails(lambda: make_image_folder(tmp_path/'x', classes=['blob']), ValueError, r'`classes`')
    _fails(lambda: make_image_folder(tmp_path/'x', ext='.gif'), ValueError, r'`ext`')
    _fails(lambda: make_image_folder(tmp_path/'x', size=0), ValueError, r'`size` must be a positive integer')
    _fails(lambda: make_image_folder(tmp_path/'file'/'sub'), NotADirectoryError, r"`dest`=.* is a file \(or under one\)")


def test_image_folders_are_written_whole(tmp_path, monkeypatch):
    "`~` is the home folder (no folder named '~' appears); an interrupted write leaves no partial folder behind"
    import rtl_fastai.data.folder as F
    monkeypatch.setenv('HOME', str(tmp_path/'home'))
    monkeypatch.chdir(tmp_path)
    f = make_image_folder('~/shapes', n_per_class=1, n_valid=1, classes=2)
    assert f == tmp_path/'home'/'shapes' and (f/'train'/'circle'/'0000.png').is_file() and not (tmp_path/'~').exists()
    calls = []
    def boom(x, fn, mode):
        calls.append(fn)
        if len(calls) == 3: raise KeyboardInterrupt
        return save(x, fn, mode)
    save = F._save
    monkeypatch.setattr(F, '_save', boom)
    (tmp_path/'empty').mkdir()
    for dest in (tmp_path/'new', tmp_path/'empty'):
        calls.clear()
        with pytest.raises(KeyboardInterrupt): make_image_folder(dest, n_per_class=2, n_valid=1, classes=2)
        assert not dest.exists() or not any(dest.iterdir()), list(dest.rglob('*'))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []   # no temporary folder left
    monkeypatch.setattr(F, '_save', save)
    # folders that cannot be replaced are written into as they are: the working folder, a link to an empty folder
    (tmp_path/'cwd').mkdir(); monkeypatch.chdir(tmp_path/'cwd')
    assert make_image_folder('.', n_per_class=1, n_valid=1, classes=2) == Path('.')
    assert (tmp_path/'cwd'/'train').is_dir() and Path.cwd() == tmp_path/'cwd'
    (tmp_path/'target').mkdir(); (tmp_path/'link').symlink_to(tmp_path/'target')
    make_image_folder(tmp_path/'link', n_per_class=1, n_valid=1, classes=2)
    assert (tmp_path/'link').is_symlink() and (tmp_path/'target'/'valid'/'circle'/'0000.png').is_file()


def test_synthetic_folder_is_learnable_not_trivial(tmp_path):
    "The class is in the shape: a small CNN learns it well above chance (1/3), better than the mean colour can tell it."
    f = make_image_folder(tmp_path/'s', n_per_class=60, n_valid=30, size=24)
    dls = folder_dls(f, size=24, bs=30, device='cpu', seed=0)
    # mean colour per image (colours are drawn independently of the class; only the shape's area leaks into it),
    # nearest class centroid fitted on the validation set itself: an optimistic colour-only baseline
    xs, ys = zip(*[(x.mean((2, 3)), y) for x, y in dls.valid])
    mc, y = torch.cat(xs), torch.cat(ys)
    cent = torch.stack([mc[y == c].mean(0) for c in range(3)])
    colour_acc = (((mc[:, None] - cent[None]) ** 2).sum(-1).argmin(1) == y).float().mean().item()
    torch.manual_seed(0)
    learn = Learner(dls, SmallCNN(n_in=3, n_out=3))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(8, 1e-2)
    acc = (learn.get_preds()[0].argmax(1) == y).float().mean().item()
    assert acc > 0.6 and acc > colour_acc, (acc, colour_acc)


def test_save_image_folder_roundtrip(tmp_path):
    d = load_digits_data()
    f = save_image_folder(d, tmp_path/'dig', classes=['1', '7'], n_per_class=4, n_valid=2)
    s = check_image_folder(f)
    assert s.classes == ['1', '7'] and (s.n_train, s.n_valid) == (8, 4) and s.modes == Counter(L=12)
    _fails(lambda: save_image_folder(d, f), FileExistsError, r'not empty')
    # the pixels survive the round trip (digits are floats in [0,1], written as 8-bit grayscale PNG)
    dls = folder_dls(f, size=8, bs=4, stats=None, device='cpu', img_cls=PILImageBW)
    x = torch.cat([b[0] for b in dls.valid]).flatten(1)
    ref = subsample_valid(select_classes(d, ['1', '7']), 2).x_valid.flatten(1)
    assert torch.allclose(x.sort(0).values, ref.sort(0).values, atol=1/255 + 1e-6)


def test_save_image_folder_cifar(tmp_path):
    try: find_data('cifar10')
    except Exception: pytest.skip('CIFAR-10 archive not found (RTL_DATA)')
    f = save_image_folder('cifar10', tmp_path/'c', classes=['cat', 'ship'], n_per_class=5, n_valid=3)
    s = check_image_folder(f)
    assert s.classes == ['cat', 'ship'] and (s.n_train, s.n_valid) == (10, 6) and s.modes == Counter(RGB=16)
    assert Image.open(next((f/'train'/'cat').iterdir())).size == (32, 32)


# ---------------------------------------------------------------------------------------------------------------
# checking a folder: every bad layout is an error naming the parameter and the fix
def test_check_good_folder(shapes):
    s = check_image_folder(shapes)
    assert s.classes == ['circle', 'square', 'triangle']
    assert s.counts == {'train': Counter(circle=8, square=8, triangle=8), 'valid': Counter(circle=4, square=4, triangle=4)}
    assert s.modes == Counter(RGB=36)
    assert 'circle' in repr(s) and '24 train and 12 valid images' in repr(s)
    assert check_image_folder(str(shapes), verify=False).modes is None


def test_check_path(tmp_path, shapes):
    _fails(lambda: check_image_folder(tmp_path/'nope'), FileNotFoundError, r"`path`=.*nope' does not exist")
    (tmp_path/'data.tgz').write_bytes(b'x')
    _fails(lambda: check_image_folder(tmp_path/'data.tgz'), NotADirectoryError, r'`path`=.* is a file.*extract it first')
    _fails(lambda: check_image_folder(3), TypeError, r'`path` must be a folder path')
    _fails(lambda: check_image_folder(shapes, valid='train'), ValueError, r'`train` and `valid` are both')


def test_check_missing_split(tmp_path, shapes):
    f = tmp_path/'f'; shutil.copytree(shapes, f); (f/'valid').rename(f/'val')
    msg = _fails(lambda: check_image_folder(f), ValueError,
                 r"has no 'valid' folder; the expected layout is path/train/<class>/\*\.jpg and path/valid/<class>/\*\.jpg, "
                 r"found subfolders \['train', 'val'\]")
    assert "`valid='val'`" in msg
    assert check_image_folder(f, valid='val').n_valid == 12
    # class folders without a split
    _fails(lambda: check_image_folder(f/'train'), ValueError, r"no 'train' folder and no 'valid' folder.*class folders without a "
           r"train/valid split.*valid_pct")
    (tmp_path/'other'/'a').mkdir(parents=True)
    _fails(lambda: check_image_folder(tmp_path/'other'), ValueError, r"found subfolders \['a'\]\. Pass `train=` and `valid=`")


def test_check_no_images(tmp_path):
    f = tmp_path/'e'
    for s in ('train', 'valid'): (f/s/'cat').mkdir(parents=True)
    (f/'train'/'cat'/'a.txt').write_text('x'); (f/'train'/'cat'/'b.heic2').write_bytes(b'x')
    _fails(lambda: check_image_folder(f), ValueError, r"no image files under .*train \(`train`='train'\); image files are those "
           r"with one of \.jpg \.jpeg \.png .* `image_extensions`; found other files: \{'\.heic2': 1, '\.txt': 1\}")
    shutil.copy(make_image_folder(tmp_path/'g', n_per_class=1, n_valid=1, classes=2)/'train'/'circle'/'0000.png', f/'train'/'cat')
    shutil.copy(f/'train'/'cat'/'0000.png', f/'train'/'cat'/'0001.png'); (f/'train'/'dog').mkdir()
    shutil.copy(f/'train'/'cat'/'0000.png', f/'train'/'dog'/'0000.png')
    _fails(lambda: check_image_folder(f), ValueError, r"no image files under .*valid \(`valid`='valid'\).*the folder is empty")


def test_check_one_class(tmp_path):
    f = make_image_folder(tmp_path/'o', n_per_class=3, n_valid=1, classes=1)
    _fails(lambda: check_image_folder(f), ValueError, r"a classifier needs images of at least 2 classes.*\{'circle': 3\}")


def test_check_class_layout(tmp_path, shapes):
    f = tmp_path/'f'; shutil.copytree(shapes, f)
    shutil.copytree(f/'valid'/'square', f/'valid'/'cross')
    _fails(lambda: check_image_folder(f), ValueError, r"classes \['cross'\] are in .*valid but not in .*train")
    shutil.rmtree(f/'valid'/'cross'); shutil.rmtree(f/'valid'/'square')
    with pytest.warns(UserWarning, match=r"no validation images of classes \['square'\]"): check_image_folder(f)
    shutil.copy(f/'train'/'circle'/'0000.png', f/'train'/'loose.png')
    _fails(lambda: check_image_folder(f), ValueError, r'1 image\(s\) lie directly in .*train.*move them into train/<class>/')


def test_check_unreadable(tmp_path, shapes):
    f = tmp_path/'f'; shutil.copytree(shapes, f)
    b = (f/'train'/'circle'/'0003.png').read_bytes(); (f/'train'/'circle'/'0003.png').write_bytes(b[:len(b)//2])  # truncated
    (f/'valid'/'square'/'0000.png').write_bytes(b'')                                                                 # empty
    (f/'valid'/'square'/'bad.jpg').write_bytes(b'<html>not an image</html>')                                        # wrong content
    msg = _fails(lambda: check_image_folder(f), ValueError,
                 r'3 of 37 image files .* cannot be read \(train/circle/0003\.png, valid/square/0000\.png, valid/square/bad\.jpg\); '
                 r'remove them, e.g\. `for f in verify_images\(get_image_files\(path\)\): f\.unlink\(\)`')
    # the fix in the message works
    from fastai.vision.utils import verify_images
    from fastai.data.transforms import get_image_files
    for p in verify_images(get_image_files(f)): p.unlink()
    assert check_image_folder(f).n_valid == 11 and 'cannot be read' in msg
    # verify=False skips the decoding
    (f/'train'/'circle'/'0004.png').write_bytes(b'')
    assert check_image_folder(f, verify=False).n_train == 23


def test_check_many_files_progress(tmp_path, shapes, capsys):
    "More files than `bar_over`: a progress bar; the result is the same."
    assert check_image_folder(shapes, bar_over=10).counts == check_image_folder(shapes).counts


# ---------------------------------------------------------------------------------------------------------------
# DataLoaders
def test_folder_dls_batches(shapes):
    dls = folder_dls(shapes, size=16, bs=6, device='cpu', seed=0)
    x, y = dls.one_batch()
    assert x.shape == (6, 3, 16, 16) and y.shape == (6,) and dls.vocab == ['circle', 'square', 'triangle'] and dls.c == 3
    m, s = normalize_stats(dls)
    assert torch.allclose(m.flatten(), torch.tensor(imagenet_stats[0])) and torch.allclose(s.flatten(), torch.tensor(imagenet_stats[1]))
    assert dls.folder_summary.n_train == 24
    # pixels in [0,1] before Normalize: undoing it gives [0,1]
    raw = x * s + m
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5 and raw.max() > 0.5
    # stats=None: no Normalize, the pixels themselves
    d0 = folder_dls(shapes, size=16, bs=6, stats=None, device='cpu', seed=0)
    assert normalize_stats(d0) is None
    x0 = torch.cat([b[0] for b in d0.valid]); xn = torch.cat([b[0] for b in dls.valid])
    assert torch.allclose(x0, xn * s + m, atol=1e-5)
    # other stats are given back as they are
    d1 = folder_dls(shapes, size=16, bs=6, stats=([0.5], [0.25]), device='cpu')
    assert torch.allclose(normalize_stats(d1)[1].flatten(), torch.tensor([0.25]))


def test_folder_dls_size_pair_and_seed(tmp_path):
    f = make_image_folder(tmp_path/'r', n_per_class=6, n_valid=2, classes=2, size=(20, 40))
    dls = folder_dls(f, size=(12, 20), bs=4, device='cpu', seed=3)
    assert dls.one_batch()[0].shape == (4, 3, 12, 20)
    def labels(d): return [y.tolist() for _ in range(2) for _, y in d.train]
    assert labels(folder_dls(f, size=8, bs=4, device='cpu', seed=3)) == labels(folder_dls(f, size=8, bs=4, device='cpu', seed=3))


def test_folder_dls_grayscale(tmp_path):
    "fastai decodes grayscale files as RGB (3 channels); with `img_cls=PILImageBW` 3-channel stats are refused."
    f = make_image_folder(tmp_path/'g', n_per_class=4, n_valid=2, classes=2, mode='L')
    assert check_image_folder(f).modes == Counter(L=12)
    x = folder_dls(f, size=8, bs=4, device='cpu').one_batch()[0]
    assert x.shape[1] == 3
    bw = folder_dls(f, size=8, bs=4, stats=([0.5], [0.25]), device='cpu', img_cls=PILImageBW)
    assert bw.one_batch()[0].shape[1] == 1
    _fails(lambda: folder_dls(f, size=8, bs=4, device='cpu', img_cls=PILImageBW), ValueError,
           r"`stats` has 3 channels but the images are decoded with 1 \(the files are L\).*give 1-channel statistics.*img_cls=PILImage")
    _fails(lambda: folder_dls(f, size=8, bs=4, stats=([.5, .5], [.2, .2]), device='cpu'), ValueError,
           r'`stats` has 2 channels but the images are decoded with 3.*decodes every file as RGB')


def test_folder_dls_bad_args(shapes, tmp_path):
    _fails(lambda: folder_dls(shapes, size=0), ValueError, r'folder_dls: `size` must be a positive integer')
    _fails(lambda: folder_dls(shapes, size=32.), ValueError, r'`size`')
    _fails(lambda: folder_dls(shapes, size=(8, 0)), ValueError, r'`size`')
    _fails(lambda: folder_dls(shapes, method='stretch'), ValueError, r"`method` must be one of \('squish', 'pad', 'crop'\)")
    _fails(lambda: folder_dls(shapes, bs=0), ValueError, r'`bs` must be an integer >= 1')
    _fails(lambda: folder_dls(shapes, bs=64), ValueError, r'`bs`=64 is larger than the 24 training images.*bs <= 24')
    _fails(lambda: folder_dls(shapes, bs=4, stats=([.5], [0.])), ValueError, r'std must be positive')
    _fails(lambda: folder_dls(tmp_path/'nope'), FileNotFoundError, r'`path`')


# ---------------------------------------------------------------------------------------------------------------
# random_tfms on fastai's resizing and augmentation
def test_random_tfms_resize(shapes, tmp_path):
    assert random_tfms(folder_dls(shapes, size=16, bs=4, device='cpu').train) == []
    assert random_tfms(folder_dls(shapes, size=16, bs=4, method='pad', device='cpu').train) == ["Resize(method='pad')"]
    assert random_tfms(folder_dls(shapes, size=16, bs=4, method='crop', device='cpu').train) == ["Resize(method='crop')"]
    aug = random_tfms(folder_dls(shapes, size=16, bs=4, augment=True, device='cpu').train)
    assert 'Flip' in aug and 'Resize(method=\'squish\')' not in aug


def test_resize_randomness_matches_fastai(tmp_path):
    "What random_tfms says agrees with what fastai's Resize does on non-square images: squish is the same every epoch."
    f = make_image_folder(tmp_path/'r', n_per_class=4, n_valid=2, classes=2, size=(20, 40))
    for method, random in (('squish', False), ('pad', True), ('crop', True)):
        dls = folder_dls(f, size=16, bs=8, stats=None, device='cpu', method=method)
        dl = dls.train.new(shuffle=False, drop_last=False)
        batches = [torch.cat([b[0] for b in dl]) for _ in range(4)]
        assert any(not torch.equal(batches[0], b) for b in batches[1:]) == random, method
        assert bool(random_tfms(dls.train)) == random, method


def test_feature_cache_on_folder(shapes):
    "A deterministic Resize does not turn the feature cache off, and cached training equals uncached training."
    res = {}
    for cache in ('auto', False):
        dls = folder_dls(shapes, size=16, bs=6, device='cpu', seed=0)
        torch.manual_seed(0); src = SmallCNN(n_in=3, n_out=5)
        learn = transfer_learner(src, dls, n_retrain=1, cache=cache)
        torch.manual_seed(1)
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
        fc = next(cb for cb in learn.cbs if isinstance(cb, FeatureCache))
        res[cache] = (fc.active, learn.model.state_dict())
    assert res['auto'][0] is True and res[False][0] is False
    for k, v in res['auto'][1].items(): assert torch.allclose(v.float(), res[False][1][k].float(), atol=1e-5), k


def test_plain_fastai_from_folder_squish_is_deterministic(shapes):
    "fastai's own `ImageDataLoaders.from_folder(..., item_tfms=Resize(64, method='squish'))`, as users write it."
    from fastai.vision.data import ImageDataLoaders
    from fastai.vision.augment import Resize
    dls = ImageDataLoaders.from_folder(shapes, item_tfms=Resize(64, method='squish'), bs=8, device='cpu', num_workers=0)
    assert random_tfms(dls.train) == []
    dls = ImageDataLoaders.from_folder(shapes, item_tfms=Resize(64), bs=8, device='cpu', num_workers=0)
    assert random_tfms(dls.train) == ["Resize(method='crop')"]


# ---------------------------------------------------------------------------------------------------------------
# a folder of class folders, split at random (`valid_pct`)
def test_valid_pct_split_is_fastais(shapes):
    "`valid_pct`: `path/<class>/*.png` split as `ImageDataLoaders.from_folder(valid_pct=...)` splits it; the summary "
    "counts the same images, whatever `seed` the loaders get; the global random state is left alone"
    root = shapes/'train'   # class folders, no split
    st = torch.get_rng_state()
    s = check_image_folder(root, valid_pct=0.25, seed=3)
    assert torch.equal(st, torch.get_rng_state())
    assert s.n_train + s.n_valid == 24 and s.n_valid == 6 and s.valid_pct == 0.25 and s.seed == 3
    dls = folder_dls(root, size=24, bs=4, valid_pct=0.25, seed=3, stats=None)
    assert sorted(map(str, dls.valid_ds.items)) == sorted(map(str, s.files[s.valid]))
    assert len(dls.train_ds) == s.n_train and dls.vocab == s.classes
    d0 = folder_dls(root, size=24, bs=4, valid_pct=0.25, stats=None)   # seed None: the split is seeded with 0
    assert sorted(map(str, d0.valid_ds.items)) == sorted(map(str, check_image_folder(root, valid_pct=0.25).files['valid']))


def test_valid_pct_errors(shapes):
    _fails(lambda: check_image_folder(shapes/'train'), ValueError, r"class folders without a train/valid split.*`valid_pct=0\.2`")
    _fails(lambda: check_image_folder(shapes, valid_pct=0.2), ValueError, r"already has train/ and valid/ folders: leave `valid_pct` out")
    for bad in (0, 1, 1.5, '0.2'):
        _fails(lambda: check_image_folder(shapes/'train', valid_pct=bad), ValueError, r"`valid_pct` must be a fraction in \(0, 1\)")


def test_nested_images_counted_as_fastai_loads_them(tmp_path):
    "An image in train/<class>/sub/: fastai's ImageDataLoaders.from_folder leaves it out, and so does the summary"
    import shutil, warnings
    from fastai.vision.all import ImageDataLoaders, Resize
    from rtl_fastai.data.folder import make_image_folder, check_image_folder
    p = make_image_folder(tmp_path/'s', n_per_class=4, n_valid=2, classes=3, size=16)
    c0 = sorted(x.name for x in (p/'train').iterdir())[0]
    (p/'train'/c0/'sub').mkdir()
    shutil.copy(next((p/'train'/c0).glob('*.png')), p/'train'/c0/'sub'/'x.png')
    with pytest.warns(UserWarning, match="leaves them out"): s = check_image_folder(p)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dls = ImageDataLoaders.from_folder(p, valid='valid', item_tfms=Resize(16), bs=4, num_workers=0)
    assert (s.classes, s.n_train, s.n_valid) == (list(dls.vocab), len(dls.train_ds), len(dls.valid_ds))


def test_16_bit_images_are_warned_about(tmp_path):
    "fastai's PILImage clips 16-bit values at 255 (a white image): check_image_folder says so"
    import numpy as np
    from PIL import Image
    for split in ('train', 'valid'):
        for c in ('a', 'b'):
            d = tmp_path/split/c; d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray((np.random.default_rng(i).random((12, 12))*60000).astype(np.uint16)).save(d/f'{i}.png')
    assert Image.open(next((tmp_path/'train'/'a').iterdir())).mode.startswith('I')
    with pytest.warns(UserWarning, match='more than 8 bits per pixel'): check_image_folder(tmp_path)
    ok = make_image_folder(tmp_path/'ok', n_per_class=2, n_valid=1, classes=2, mode='L')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        check_image_folder(ok)


def test_input_channels_read_without_moving_the_shuffle(tmp_path):
    "`train_source` reads the channels of a folder's images from one item: a seeded loader's shuffle stays as it was"
    from rtl_fastai.experiment import _n_in
    folder = make_image_folder(tmp_path/'f', n_per_class=4, n_valid=1, classes=3, size=8)
    def first_epoch(peek):
        dls = folder_dls(folder, size=8, bs=4, seed=0, verify=False, device='cpu')
        if peek: assert _n_in(dls) == 3
        return [b[1].tolist() for b in dls.train]
    assert first_epoch(True) == first_epoch(False)


def test_labels_in_a_csv_file_get_advice(tmp_path):
    "A folder labelled by a CSV file (images/ and labels.csv): the errors say that labels come from class folders only "
    "here and point to fastai's `ImageDataLoaders.from_csv`, rather than to a random split of one 'class'"
    (tmp_path/'images').mkdir()
    for i in range(10): Image.new('RGB', (8, 8), (i*20, 0, 0)).save(tmp_path/'images'/f'{i}.png')
    (tmp_path/'labels.csv').write_text('name,label\n' + ''.join(f'images/{i}.png,{"ab"[i%2]}\n' for i in range(10)))
    for kw in ({}, dict(valid_pct=0.2)):
        _fails(lambda: check_image_folder(tmp_path, **kw), ValueError,
               r"holds labels\.csv: labels in a CSV file are not read here.*ImageDataLoaders\.from_csv")
    _fails(lambda: check_image_folder(tmp_path, valid_pct=0.2), ValueError, rf"{re.escape(str(tmp_path))} has 1 \(")


def test_upsampling_is_warned_about(shapes):
    "`Resize` to a size larger than the images (24x24): the attacks would perturb the upsampled images; a warning says "
    "so and what to do. At or below their size, or with the user's own `item_tfms`, nothing is said"
    with pytest.warns(UserWarning, match=r"about 24x24 pixels and `Resize` upsamples them to 48x48.*upsample inside the model"):
        folder_dls(shapes, size=48, bs=4, device='cpu')
    from fastai.vision.augment import Resize
    for kw in (dict(size=24), dict(size=16), dict(size=(16, 48)), dict(item_tfms=Resize(48))):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always'); folder_dls(shapes, bs=4, device='cpu', **kw)
        assert not [o for o in w if 'upsamples' in str(o.message)], kw


def test_written_folders_have_the_usual_permissions(tmp_path):
    "A folder written whole (through a temporary folder, 0o700) gets the mode `mkdir` gives, or keeps that of the empty "
    "folder it replaces: others on a shared machine can read the data set"
    import os
    old = os.umask(0o022)
    try:
        f = make_image_folder(tmp_path/'shapes', n_per_class=2, n_valid=1, classes=2, size=8)
        assert f.stat().st_mode & 0o7777 == 0o755
        (tmp_path/'shared').mkdir(); os.chmod(tmp_path/'shared', 0o2775)
        g = make_image_folder(tmp_path/'shared', n_per_class=2, n_valid=1, classes=2, size=8)
        assert g.stat().st_mode & 0o7777 == 0o2775
        assert all(p.stat().st_mode & 0o2000 for p in g.rglob('*') if p.is_dir())   # setgid passed on, as mkdir would
        assert os.umask(0o022) == 0o022   # the process's umask as it was
    finally: os.umask(old)
    if os.geteuid() == 0:   # (root can give a folder to any group) the group of the folder replaced, to everything
        (tmp_path/'grp').mkdir(); os.chown(tmp_path/'grp', -1, 1234); os.chmod(tmp_path/'grp', 0o2770)
        h = make_image_folder(tmp_path/'grp', n_per_class=2, n_valid=1, classes=2, size=8)
        assert {p.stat().st_gid for p in [h, *h.rglob('*')]} == {1234} and h.stat().st_mode & 0o7777 == 0o2770


def test_class_folders_beside_a_csv_file_get_the_split_advice(tmp_path):
    "Class folders and a metadata CSV file: they are class folders, and the advice is the random split, not the CSV"
    for c in ('a', 'b'):
        (tmp_path/c).mkdir()
        for i in range(3): Image.new('RGB', (8, 8)).save(tmp_path/c/f'{i}.png')
    (tmp_path/'metadata.csv').write_text('name,source\n')
    _fails(lambda: check_image_folder(tmp_path), ValueError, r"look like class folders.*`valid_pct=0\.2`")
