"Shared fixtures: a small CNN trained once per test session on the embedded 8x8 digits."
import pytest, torch
from fastai.learner import Learner
import fastai.callback.all  # noqa: F401  (Learner.no_bar, MixedPrecision, ...)
from fastai.metrics import accuracy
from rtl_fastai.data.all import task_dls
from rtl_fastai.models import SmallCNN

@pytest.fixture(scope='session')
def digits_dls(device):
    "Digits `DataLoaders` (all 10 classes, fastai `Normalize` in `after_batch`, 450 validation images) on `device`."
    return task_dls('digits', bs=64, seed=0, device=device)

@pytest.fixture(scope='session')
def digits_rgb32():
    "Digits 5-9 as 3x32x32 images in [0,1] (for ImageNet-style and CIFAR models): 16 per class to train, 40 to validate"
    import torch.nn.functional as F
    from rtl_fastai.data.all import load_digits_data, select_classes, ArrayData
    d = select_classes(load_digits_data(), list('56789'))
    def up(x): return F.interpolate(x, size=32, mode='nearest').repeat(1, 3, 1, 1)
    keep = torch.cat([(d.y_train == c).nonzero()[:16, 0] for c in range(5)])
    return ArrayData(up(d.x_train[keep]), d.y_train[keep], up(d.x_valid[:40]), d.y_valid[:40], d.classes, 'digits-rgb')

@pytest.fixture(scope='session')
def digits_model(digits_dls):
    "A `SmallCNN` trained 3 epochs on digits (about 98% clean accuracy), in eval mode; do not modify it in place."
    torch.manual_seed(0)
    learn = Learner(digits_dls, SmallCNN(n_in=1, n_out=10), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-3)
    return learn.model.eval()


# -- device option (issue 15) -------------------------------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption('--device', default=None,
                     help="device the device-aware tests use: 'cpu' (default), 'cuda' or 'cuda:N'; "
                          "the RTL_TEST_DEVICE (or RTL_DEVICE) environment variable sets it too (the option wins)")

def asked_device(config):
    "The device asked for by `--device`, else `RTL_TEST_DEVICE`, else `RTL_DEVICE` (what the notebooks honour), else None."
    import os
    return config.getoption('--device') or os.environ.get('RTL_TEST_DEVICE') or os.environ.get('RTL_DEVICE') or None

def pytest_configure(config):
    "A device asked for is also fastai's `default_device()` (`use_device`), so code that takes no device follows it."
    from rtl_fastai.core import use_device
    name = asked_device(config)
    if name is None: return
    try: dev = torch.device(name)
    except RuntimeError: return  # the `device` fixture reports it
    if dev.type == 'cpu' or (dev.type == 'cuda' and torch.cuda.is_available()): use_device(dev)

@pytest.fixture(scope='session')
def device(pytestconfig) -> torch.device:
    "The `torch.device` tests run on (`--device` / `RTL_TEST_DEVICE` / `RTL_DEVICE`, default cpu); skips if CUDA is asked for but absent."
    name = asked_device(pytestconfig) or 'cpu'
    try: dev = torch.device(name)
    except RuntimeError as e: raise pytest.UsageError(f"--device / RTL_TEST_DEVICE: {name!r} is not a torch device ({e})") from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        pytest.skip(f"--device/RTL_TEST_DEVICE asks for {name!r} but torch.cuda.is_available() is False on this machine")
    return dev
