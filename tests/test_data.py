"Tests of `rtl_fastai.data` (`external`, `arrays`, `loaders`): data paths, cache, class selection, stats and `task_dls`."
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from fastai.data.transforms import Normalize

import rtl_fastai.data.external as external
from rtl_fastai.data.all import (LAYOUTS, load_dataset, load_digits_data, find_data,
                             class_split, select_classes, subsample, normalize_stats, task_dls, cache_dir)

ORIG_SHARED = external._shared_candidates  # before the fixture patches it
SHARED = Path(__file__).resolve().parents[1].parent/'shared'/'data'


def fake_folder(root, name='cifar10', n=3, classes=('cat', 'dog', 'ship'), size=32):
    l = LAYOUTS[name]; rng = np.random.default_rng(0)
    for split in (l.train, l.valid):
        for c in classes:
            d = Path(root)/l.folder/split/c; d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size, size, 3) if l.mode == 'RGB' else (size, size)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(d/f'{i:04d}{l.ext}')
    return Path(root)/l.folder


def fake_archive(root, name='cifar10', **kwargs):
    src = fake_folder(Path(root)/'src', name, **kwargs)
    arc = Path(root)/LAYOUTS[name].archive
    with tarfile.open(arc, 'w:gz') as tf: tf.add(src, arcname=src.name)
    return arc


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    "Every test gets its own cache, no RTL_DATA, and no `shared/data` or download fallback"
    monkeypatch.setenv('RTL_CACHE', str(tmp_path/'cache'))
    monkeypatch.delenv('RTL_DATA', raising=False)
    monkeypatch.setattr(external, '_shared_candidates', lambda: [])
    def no_download(url): raise AssertionError(f'untar_data({url}) must not be called in tests')
    monkeypatch.setattr(external, 'untar_data', no_download)


@pytest.fixture(scope='module')
def digits(): return load_digits_data()


# ---- data paths ----
def test_archive(tmp_path):
    arc = fake_archive(tmp_path/'a')
    d = load_dataset('cifar10', path=arc)
    assert d.x_train.shape == (9, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.classes == ['cat', 'dog', 'ship'] and d.y_train.tolist() == [0]*3 + [1]*3 + [2]*3
    assert d.name == 'cifar10'
    assert (cache_dir()).is_relative_to(tmp_path)  # never the real cache
    assert not any(p.suffix == '.npy' for p in arc.parent.rglob('*'))  # nothing written next to the source


def test_leftovers_of_killed_loads_are_swept(tmp_path):
    "What a load killed earlier left in the cache (a half-extracted archive, older than a day) goes at the next load; "
    "another process's fresh temporary folder and the cache's entries stay"
    import os, time
    cache = cache_dir(); cache.mkdir(parents=True)
    old, fresh = cache/'.extract-dead', cache/'.extract-live'
    (old/'extracted').mkdir(parents=True); fresh.mkdir(); (cache/'.part123-x.pth').write_bytes(b'x')
    (cache/'.partials').mkdir(); (cache/'.parted.conf').write_text('a user\'s')   # not ours: never touched
    day_ago = time.time() - 2*86400
    for p in (old, cache/'.part123-x.pth', cache/'.partials', cache/'.parted.conf'): os.utime(p, (day_ago, day_ago))
    load_dataset('cifar10', path=fake_archive(tmp_path/'a'))
    left = sorted(p.name for p in cache.iterdir())
    assert '.extract-dead' not in left and '.part123-x.pth' not in left and '.extract-live' in left
    assert '.partials' in left and '.parted.conf' in left
    assert any(n.startswith('cifar10-') for n in left)


def test_archive_matches_pixels(tmp_path):
    src = fake_folder(tmp_path/'f', 'mnist', classes=('0', '1'), size=28)
    d = load_dataset('mnist', path=src)
    img = np.array(Image.open(src/'testing'/'1'/'0002.png'))
    assert torch.equal(d.x_valid[-1, 0], torch.from_numpy(img))
    assert d.x_train.shape == (6, 1, 28, 28)


def test_extracted_folder_and_parent(tmp_path):
    fold = fake_folder(tmp_path/'f')
    assert find_data('cifar10', fold) == ('folder', fold)
    assert find_data('cifar10', fold.parent) == ('folder', fold)
    a, b = load_dataset('cifar10', path=fold), load_dataset(str(fold.parent))  # by name and by bare path
    assert torch.equal(a.x_train, b.x_train) and b.name == 'cifar10'


def test_env_var(tmp_path, monkeypatch):
    arc = fake_archive(tmp_path/'d')
    monkeypatch.setenv('RTL_DATA', str(arc.parent))      # a folder holding cifar10.tgz
    assert find_data('cifar10') == ('archive', arc)
    assert load_dataset('cifar10').n_valid == 9
    monkeypatch.setenv('RTL_DATA', str(arc))             # the archive itself
    assert find_data('cifar10') == ('archive', arc)
    monkeypatch.setenv('RTL_DATA', str(tmp_path/'missing'))
    with pytest.raises(FileNotFoundError, match='RTL_DATA'): find_data('cifar10')


def test_fallback_order(tmp_path, monkeypatch):
    shared = tmp_path/'shared'/'data'
    arc = fake_archive(shared)
    monkeypatch.setattr(external, '_shared_candidates', lambda: [shared])
    assert find_data('cifar10') == ('archive', arc)
    calls = []
    def fake_untar(url): calls.append(url); return fake_folder(tmp_path/'dl', 'mnist', classes=('0', '1'), size=28)
    monkeypatch.setattr(external, 'untar_data', fake_untar)
    assert find_data('mnist')[0] == 'folder'              # not in shared: downloads with fastai
    assert calls == [LAYOUTS['mnist'].url]


def test_shared_candidates_real():
    if not SHARED.is_dir(): pytest.skip('no ../shared/data')
    assert SHARED.resolve() in [p.resolve() for p in ORIG_SHARED()]  # found from the package's checkout (and the cwd)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e: load_dataset('cifar10', path=tmp_path/'nope')
    assert 'nope' in str(e.value) and 'cifar10/train/<class>/*.jpg' in str(e.value)
    with pytest.raises(FileNotFoundError, match='neither a dataset name'): load_dataset(str(tmp_path/'nope'))


def test_malformed_folder(tmp_path):
    bad = tmp_path/'cifar10'/'training'/'cat'; bad.mkdir(parents=True)  # mnist-style split names
    with pytest.raises(ValueError) as e: load_dataset('cifar10', path=tmp_path)
    assert str(tmp_path/'cifar10') in str(e.value) and 'cifar10/test/<class>/*.jpg' in str(e.value)
    with pytest.raises(ValueError, match='neither MNIST nor CIFAR-10'): load_dataset(str(tmp_path))
    empty = tmp_path/'e'/'cifar10'; (empty/'train').mkdir(parents=True); (empty/'test').mkdir()
    with pytest.raises(ValueError) as e: load_dataset('cifar10', path=empty)
    assert str(empty/'train') in str(e.value) and 'expected cifar10/train/<class>' in str(e.value)


def test_mismatched_classes(tmp_path):
    fold = fake_folder(tmp_path/'f')
    for f in (fold/'test'/'ship').iterdir(): f.unlink()
    (fold/'test'/'ship').rmdir()
    with pytest.raises(ValueError, match='ship'): load_dataset('cifar10', path=fold)


def test_cache_reused(tmp_path, monkeypatch):
    arc = fake_archive(tmp_path/'a')
    a = load_dataset('cifar10', path=arc)
    npys = sorted(cache_dir().rglob('train_x.npy'))
    assert len(npys) == 1
    mtime = npys[0].stat().st_mtime_ns
    def boom(*args, **kwargs): raise AssertionError('decoded twice')
    monkeypatch.setattr(external, '_decode_split', boom)
    monkeypatch.setattr(external, '_extract', boom)
    b = load_dataset('cifar10', path=arc)
    assert torch.equal(a.x_train, b.x_train) and npys[0].stat().st_mtime_ns == mtime
    assert not list(cache_dir().rglob('*.tmp'))  # atomic writes leave no temporaries


def test_real_cifar_detection():
    arc = SHARED/'cifar10.tgz'
    if not arc.exists(): pytest.skip('no ../shared/data/cifar10.tgz')
    assert find_data('cifar10', arc) == ('archive', arc)
    assert find_data('cifar10', SHARED) == ('archive', arc)
    assert find_data('mnist', SHARED) == ('archive', SHARED/'mnist_png.tgz')


# ---- digits, classes and subsampling ----
def test_digits(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.x_train.dtype == torch.float32
    assert 0 <= digits.x_train.min() and digits.x_train.max() <= 1
    assert digits.n_train + digits.n_valid == 1797 and digits.classes == list('0123456789')
    assert (digits.c, digits.n_channels, digits.img_size) == (10, 1, (8, 8))
    assert 'digits' in repr(digits) and '10 classes' in repr(digits)
    assert torch.equal(load_digits_data(seed=0).y_train, digits.y_train)
    assert not torch.equal(load_digits_data(seed=1).y_train, digits.y_train)


def test_default_split(digits):
    assert class_split('digits') == (list('01234'), list('56789')) == class_split('mnist')
    s = class_split('cifar10')
    assert set(s.source) == {'bird', 'cat', 'deer', 'dog', 'frog', 'horse'}
    assert set(s.target) == {'airplane', 'automobile', 'ship', 'truck'}
    with pytest.raises(ValueError, match='known are'): class_split('svhn')


def test_select_classes(digits):
    s = select_classes(digits, ['9', 3])
    assert s.classes == ['9', '3'] and s.y_train.unique().tolist() == [0, 1]
    assert torch.equal(s.x_train[s.y_train == 0], digits.x_train[digits.y_train == 9])
    assert torch.equal(s.x_valid[s.y_valid == 1], digits.x_valid[digits.y_valid == 3])
    with pytest.raises(ValueError) as e: select_classes(digits, ['3', 'cat'])
    assert "'cat'" in str(e.value) and "['0', '1'" in str(e.value)
    with pytest.raises(ValueError, match='twice'): select_classes(digits, [3, '3'])


def test_subsample(digits):
    s = subsample(digits, 7, seed=3)
    assert s.y_train.bincount().tolist() == [7]*10
    assert torch.equal(s.x_valid, digits.x_valid) and torch.equal(s.y_valid, digits.y_valid)
    assert torch.equal(subsample(digits, 7, seed=3).x_train, s.x_train)
    assert not torch.equal(subsample(digits, 7, seed=4).x_train, s.x_train)
    with pytest.raises(ValueError, match='n_per_class=500'): subsample(digits, 500)
    with pytest.raises(ValueError, match='`n_per_class` must be an integer >= 1'): subsample(digits, 0)


# ---- normalize_stats ----
def test_normalize_stats_kinds():
    for pair in [(0.5, 0.25), ([0.5], [0.25]), (torch.tensor(0.5), torch.tensor([0.25]))]:
        m, s = normalize_stats(pair)
        assert m.shape == s.shape == (1, 1, 1, 1) and m.dtype == torch.float32
        assert torch.allclose(s, torch.tensor(0.25))
    m, s = normalize_stats(([0.1, 0.2, 0.3], (0.4, 0.5, 0.6)))
    assert m.shape == (1, 3, 1, 1) and torch.allclose(s.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    m, s = normalize_stats(Normalize.from_stats([0.1, 0.2, 0.3], [0.4, 0.5, 0.6], cuda=False))
    assert m.shape == (1, 3, 1, 1) and torch.allclose(m.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert normalize_stats(None) is None
    with pytest.raises(ValueError, match='std must be positive'): normalize_stats((0., -1.))
    with pytest.raises(ValueError, match='channels'): normalize_stats(([0.1, 0.2], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match='no mean/std'): normalize_stats(Normalize())
    with pytest.raises(TypeError, match='expected DataLoaders'): normalize_stats(3)


def test_normalize_stats_dls(digits):
    dls = task_dls(digits, device='cpu')
    m, s = normalize_stats(dls)
    assert m.shape == (1, 1, 1, 1)
    assert torch.allclose(m.flatten(), digits.x_train.mean(), atol=1e-4)
    assert torch.allclose(s.flatten(), digits.x_train.std(), atol=1e-3)
    assert torch.allclose(normalize_stats(dls.train)[0], m)
    assert dls.stats is not None and torch.allclose(dls.stats[1], s)
    assert normalize_stats(task_dls(digits, normalize=False, device='cpu')) is None
    # a stats attribute alone (no Normalize in after_batch) is used too
    plain = task_dls(digits, normalize=False, device='cpu'); plain.stats = (0.5, 0.5)
    assert torch.allclose(normalize_stats(plain)[0], torch.tensor(0.5))


# ---- task_dls ----
def test_task_dls_shapes(digits):
    dls = task_dls(digits, classes='target', n_per_class=20, bs=16, device='cpu')
    x, y = dls.one_batch()
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert type(x).__name__ == 'TensorImage' and type(y).__name__ == 'TensorCategory'
    assert dls.vocab == list('56789') and dls.c == 5 and len(dls.train_ds) == 100
    assert len(dls.train) == 100 // 16                        # training drops the last partial batch
    assert sum(len(b[1]) for b in dls.valid) == len(dls.valid_ds)  # validation keeps every item, in order
    assert torch.equal(torch.cat([b[1] for b in dls.valid]), dls.valid_ds.y)


def test_task_dls_range_before_normalize(digits):
    dls = task_dls(digits, device='cpu')
    x, _ = dls.valid.one_batch()
    raw = dls.decode((x,))[0]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert torch.allclose(raw, digits.x_valid[:len(raw)], atol=1e-5)
    assert abs(x.mean().item()) < 0.3  # normalized


def test_task_dls_uint8_and_augment(tmp_path):
    a = load_dataset('cifar10', path=fake_archive(tmp_path/'a'))
    raw = task_dls(a, bs=9, normalize=False, device='cpu').valid.one_batch()[0]
    assert torch.allclose(raw, a.x_valid.float()/255)
    aug = task_dls(a, bs=4, augment=True, device='cpu')
    assert aug.train.one_batch()[0].shape == (4, 3, 32, 32)
    assert any(type(t).__name__ == 'FlipPadCrop' for t in aug.train.after_batch.fs)
    with pytest.raises(ValueError, match='32x32'): task_dls('digits', augment=True)


def test_task_dls_seeded_shuffle(digits):
    ys = [task_dls(digits, bs=32, seed=s, device='cpu').one_batch()[1] for s in (0, 0, 1)]
    assert torch.equal(ys[0], ys[1]) and not torch.equal(ys[0], ys[2])
    dls = task_dls(digits, bs=32, device='cpu')
    assert not torch.equal(dls.train.one_batch()[1], dls.train.one_batch()[1])  # new order each epoch


def test_task_dls_learner(digits):
    from fastai.vision.all import Learner, accuracy  # with the callbacks (progress, recorder) fastai adds
    dls = task_dls(digits, classes='source', n_per_class=30, bs=32, device='cpu')
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, dls.c))
    learn = Learner(dls, model, metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    loss, acc = learn.validate()
    preds, targs = learn.get_preds()
    assert preds.shape == (len(dls.valid_ds), 5) and torch.equal(targs, dls.valid_ds.y)


def test_offline_download_failure_is_a_clear_file_not_found(monkeypatch):
    "No local copy and no network: a FileNotFoundError that says where to put the archive (the CLI's and the tutorials' fallbacks catch it)"
    import urllib.error
    import rtl_fastai.data.external as ext
    monkeypatch.delenv('RTL_DATA', raising=False)
    monkeypatch.setattr(ext, '_shared_candidates', lambda: [])
    def offline(*a, **k): raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(ext, 'untar_data', offline)
    with pytest.raises(FileNotFoundError, match=r"downloading it from .* failed \(URLError.*set RTL_DATA"):
        ext.find_data('cifar10')


def test_folder_cache_follows_the_folder(tmp_path):
    "An extracted folder's decoded cache is rebuilt when images or classes are added (it kept the first decoding)"
    src = fake_folder(tmp_path/'f', 'mnist', classes=('0', '1'), size=28)
    assert load_dataset('mnist', path=src).n_train == 6
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(src/'training'/'1'/'0099.png')
    (src/'training'/'2').mkdir(); (src/'testing'/'2').mkdir()
    for split in ('training', 'testing'): Image.fromarray(np.zeros((28, 28), np.uint8)).save(src/split/'2'/'0000.png')
    d = load_dataset('mnist', path=src)
    assert d.n_train == 8 and d.classes == ['0', '1', '2']
    assert load_dataset('mnist', path=src).n_train == 8   # and read from the cache again while the folder is as it is
    assert len([c for c in cache_dir().iterdir() if c.name.startswith('mnist_png-')]) == 2   # two states, two decodings


def test_archive_cache_drops_unread_states(tmp_path, monkeypatch):
    "A re-copied archive (new mtime) is decoded again; the entry of its earlier state goes once unread for a week "
    "(two states in use at once keep both); the extracted files are not kept"
    import os, time
    arc = fake_archive(tmp_path/'d')
    def touch(ns): st = arc.stat(); os.utime(arc, ns=(st.st_atime_ns, st.st_mtime_ns + ns))
    a = load_dataset('cifar10', path=arc)
    first = next(cache_dir().iterdir())
    assert sorted(f.name for f in first.iterdir()) == sorted(
        ['classes.json', 'source.txt', 'train_x.npy', 'train_y.npy', 'valid_x.npy', 'valid_y.npy'])
    touch(10**9)
    b = load_dataset('cifar10', path=arc)
    assert torch.equal(a.x_train, b.x_train) and len(list(cache_dir().iterdir())) == 2   # the first was read just now
    week = time.time() - 8*86400
    for e in cache_dir().iterdir(): os.utime(e/'source.txt', (week, week))   # neither read for 8 days
    touch(10**9)
    load_dataset('cifar10', path=arc)
    assert len(list(cache_dir().iterdir())) == 1   # a third state: the two unread ones are gone
    other = fake_archive(tmp_path/'e')   # another archive of the same name: its own entry, the first one kept
    for e in cache_dir().iterdir(): os.utime(e/'source.txt', (week, week))
    load_dataset('cifar10', path=other)
    assert len(list(cache_dir().iterdir())) == 2


def test_bad_archive_and_cache(tmp_path, monkeypatch):
    "A truncated archive and an `RTL_CACHE` that is a file are named, with what to do"
    arc = fake_archive(tmp_path/'d')
    (tmp_path/'t').mkdir()
    (tmp_path/'t'/'cifar10.tgz').write_bytes(arc.read_bytes()[:len(arc.read_bytes())//2])
    with pytest.raises(ValueError, match=r"cifar10\.tgz cannot be read .*truncated or corrupt\? Copy or download it again"):
        load_dataset('cifar10', path=tmp_path/'t'/'cifar10.tgz')
    assert not [c for c in cache_dir().iterdir() if not c.name.startswith('.')] and not any(
        c.name.startswith('.extract') for c in cache_dir().iterdir())
    (tmp_path/'afile').write_text('x')
    monkeypatch.setenv('RTL_CACHE', str(tmp_path/'afile'))
    with pytest.raises(NotADirectoryError, match='`RTL_CACHE`=.*afile.* is a file'): load_dataset('cifar10', path=arc)


def test_select_classes_refuses_a_set(digits):
    "A set's order changes from one process to the next (hash seeds): the labels 0..k-1 would too"
    with pytest.raises(TypeError, match='must be ordered'): select_classes(digits, {'3', '5', '8'})


def test_hidden_files_are_skipped(tmp_path):
    "macOS's `._name.png` next to the images (and hidden folders) are skipped, as fastai's get_image_files does"
    fold = fake_folder(tmp_path/'f')
    a = load_dataset('cifar10', path=fold)
    for split in ('train', 'test'):
        (fold/split/'cat'/'._0.png').write_bytes(b'\x00\x05junk')
        (fold/split/'.hidden').mkdir()
    b = load_dataset('cifar10', path=fold)
    assert torch.equal(a.x_train, b.x_train) and b.classes == a.classes
