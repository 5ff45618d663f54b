"The cached source models of the tuning scripts (`tune_issue13.py`, `probe_l2.py`): one file per setting of their data and training."
from rtl_fastai.data.external import cache_dir
from rtl_fastai.core import make_dir

_SOURCE_SETTINGS = ('n_source', 'source_epochs', 'lr', 'width', 'at_steps', 'bs', 'holdout', 'n_test')

def source_file(prefix:str, seed:int, d:dict, eps:float)->str:
    "The cache file of a source trained with the pipeline settings `d` at radius `eps` (every setting in its name)"
    key = '_'.join(f"{k}{d.get(k)}" for k in _SOURCE_SETTINGS)
    return str(make_dir(cache_dir(), 'RTL_CACHE')/f"{prefix}_{seed}_{key}_eps{eps:g}.pth")
