"Shared fixtures: a small CNN trained once per test session on the embedded 8x8 digits."
import pytest, torch
from fastai.learner import Learner
import fastai.callback.all  # noqa: F401  (Learner.no_bar, MixedPrecision, ...)
from fastai.metrics import accuracy
from rtl_fastai.data.all import task_dls
from rtl_fastai.models import SmallCNN

@pytest.fixture(scope='session')
def digits_dls():
    "Digits `DataLoaders` (all 10 classes, fastai `Normalize` in `after_batch`, 450 validation images)."
    return task_dls('digits', bs=64, seed=0)

@pytest.fixture(scope='session')
def digits_model(digits_dls):
    "A `SmallCNN` trained 3 epochs on digits (about 98% clean accuracy), in eval mode; do not modify it in place."
    torch.manual_seed(0)
    learn = Learner(digits_dls, SmallCNN(n_in=1, n_out=10), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-3)
    return learn.model.eval()
