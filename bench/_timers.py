"Shared by the bench scripts (run as `python bench/NAME.py`, so this folder is on `sys.path`)."
import time
import torch
from fastai.callback.core import Callback

def _sync(dls):
    "Wait for the GPU's queued work (fastai's loop does not, in fp32 or bf16: a timer would stop before the GPU did)"
    dev = getattr(dls, 'device', None)
    if dev is not None and torch.device(dev).type == 'cuda': torch.cuda.synchronize(dev)

class EpochTimer(Callback):
    "Wall time of the training phase of each epoch (validation excluded), in `self.times`; the GPU synchronized at both ends"
    order = 100
    def before_fit(self): self.times = []
    def before_train(self): _sync(self.dls); self.t0 = time.perf_counter()
    def after_train(self): _sync(self.dls); self.times.append(time.perf_counter() - self.t0)
