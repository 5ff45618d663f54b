"Shared by the bench scripts (run as `python bench/NAME.py`, so this folder is on `sys.path`)."
import time
from fastai.callback.core import Callback

class EpochTimer(Callback):
    "Wall time of the training phase of each epoch (validation excluded), in `self.times`"
    order = 100
    def before_fit(self): self.times = []
    def before_train(self): self.t0 = time.perf_counter()
    def after_train(self): self.times.append(time.perf_counter() - self.t0)
