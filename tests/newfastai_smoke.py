"""Smoke run of the library under the newest fastai (fastcore 2.x): run by scripts/check_new_fastai.sh in
.venv-newfastai, not by pytest (the dev venv pins fastai 2.8.7). Exits non-zero on any failure."""
import torch, fastai
from fastai.vision.all import Learner, accuracy, set_seed
from rtl_fastai.data.all import task_dls
from rtl_fastai.models import SmallCNN
from rtl_fastai.callback.adv_valid import RobustAccuracy
from rtl_fastai.callback.adv_train import PGDTraining
from rtl_fastai.callback.transfer import transfer_learner
from rtl_fastai.callback.distill import FeatureDistillation

torch.set_num_threads(1)
set_seed(0, reproducible=True)
src, tgt = task_dls('digits', classes='source'), task_dls('digits', classes='target')
learn = Learner(src, SmallCNN(n_in=1, n_out=src.c), metrics=[accuracy, RobustAccuracy(eps=0.2, steps=5)],
                cbs=PGDTraining(0.2, steps=3))
with learn.no_bar(): learn.fit_one_cycle(2, 3e-3)
r = learn.robust_validate(eps=0.2, steps=10, show_progress=False)
assert 0.5 < r['clean_acc'] <= 1 and 0 <= r['robust_acc'] <= r['clean_acc'], r
t = transfer_learner(learn, tgt, n_retrain=0, metrics=accuracy)
with t.no_bar(), t.no_logging(): t.fit_one_cycle(1, 3e-3)
f = transfer_learner(learn, tgt, n_retrain='all', metrics=accuracy)
with f.no_bar(), f.no_logging(): f.fit_one_cycle(1, 3e-3, cbs=FeatureDistillation(learn.model, lam=5e-3))
print(f"newest-fastai smoke run OK (fastai {fastai.__version__}): source {r}, transfer {t.validate()[1]:.3f}, distill {f.validate()[1]:.3f}")
