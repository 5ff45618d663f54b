#!/usr/bin/env python
"""The paper study on one GPU, at full width (issue 15, part 4): CIFAR-10 animals (6 classes) -> vehicles (4 classes),
PreActResNet18 of width 64 (or `--arch wrn`), in a fixed time budget (default 8 minutes, `--budget_minutes`).

1. source: a robust source on animals, fast AT (FGSM-RS, eps 8/255; `--source pgd`: PGD-7 AT), all training images;
2. block-by-block transfer to vehicles from it (n_retrain 0, 1, 2, 'all'; frozen blocks served by the feature cache);
3. end-to-end fine-tuning with feature distillation toward the source, lam in `--lams`;
4. low-data regime: head-only transfer against PGD-7 AT from scratch (same optimizer steps) at each learning rate of
   `--scratch_lrs` (its best is the fair baseline), N per class in `--low_n`.
Every model is evaluated with PGD-20 (L-inf, eps 8/255, step 2/255, random start) on ALL the CIFAR-10 test images of its
task (6000 animals, 4000 vehicles). The epochs come from a short calibration on the device: the per-image costs of a
training pass and of an attack step are measured first, and the epochs/steps are scaled so the whole study fits the
budget; the planned and the measured wall time of each stage are printed, so a later run can tune them.

    python scripts/gpu_study.py                                  # on a GPU, 8 minutes
    python scripts/gpu_study.py --bf16 --channels_last --budget_minutes 4
    OMP_NUM_THREADS=1 python scripts/gpu_study.py --device cpu --tiny   # the code path at tiny sizes, about a minute
"""
import contextlib, json, time, warnings
from pathlib import Path
import torch
import fastai
from fastcore.script import call_parse
from fastai.learner import Learner
from fastai.callback.core import Callback, CancelValidException
from fastai.torch_core import set_seed
import fastai.callback.all  # noqa: F401  (fit_one_cycle, no_bar, to_fp16, to_bf16)
from fastai.metrics import accuracy
from rtl_fastai.data.all import load_dataset, select_classes, subsample, subsample_valid, class_split, task_dls, ArrayData
from rtl_fastai.models import PreActResNet18, WideResNet
from rtl_fastai.attacks import pgd_attack
from rtl_fastai.attacks import ThreatModel
from rtl_fastai.callback.adv_valid import robust_validate
from rtl_fastai import experiment
from rtl_fastai.callback.adv_train import FastAdvTraining, PGDTraining
from rtl_fastai.callback.transfer import transfer_learner
from rtl_fastai.callback.distill import FeatureDistillation

EPS, ALPHA = 8/255, 2/255
THREAT = ThreatModel(EPS, steps=20, alpha=ALPHA)  # the paper's PGD-20 evaluation

# ---- protocol helpers: rtl_fastai.experiment's `fit_quietly`, plus what the GPU study adds to it (mixed precision,
# ---- no per-epoch validation); nothing else in this script knows how a model is fitted or evaluated.
def set_amp(learn, dtype):
    if dtype == torch.float16: learn.to_fp16()
    elif dtype == torch.bfloat16: learn.to_bf16()
    return learn

class NoValidation(Callback):
    "Skip the validation pass of each epoch: every model is evaluated once, after training (`evaluate`)."
    def before_validate(self): raise CancelValidException()

def fit_quietly(learn, epochs, lr, cbs=(), dtype=torch.float32):
    "`experiment.fit_quietly` without per-epoch validation, under the mixed precision `dtype`."
    return experiment.fit_quietly(set_amp(learn, dtype), epochs, lr, list(cbs) + [NoValidation()])

def evaluate(learn, dtype=torch.float32, seed=0):
    "Clean and PGD-20 (8/255, step 2/255) accuracy on all of `learn.dls.valid`, under autocast `dtype`."
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(learn.dls.device.type, dtype=dtype)
    with ctx: r = robust_validate(learn, threat=THREAT, show_progress=False, seed=seed)
    return dict(clean_acc=round(r['clean_acc'], 4), pgd20_acc=round(r['robust_acc'], 4), n_test=r['n'])

def train_source(dls, make_model, kind, epochs, dtype, lr=2e-3):
    "A source model trained on `dls` with fast AT ('fast') or PGD-7 AT ('pgd')."
    cb = FastAdvTraining(EPS) if kind == 'fast' else PGDTraining(EPS, steps=7, alpha=ALPHA)
    return fit_quietly(Learner(dls, make_model(dls.c), metrics=accuracy), epochs, lr, [cb], dtype)
# ---- end of the protocol helpers ------------------------------------------------------------------------------------


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


@call_parse
def main(device:str=None,            # 'cuda', 'cuda:N' or 'cpu' (default: cuda if available)
         tiny:bool=False,            # tiny sizes and one epoch everywhere, to try the code path on the CPU
         budget_minutes:float=8.,    # wall-time budget of the whole study (calibration and data loading included)
         arch:str='preact18',        # 'preact18' (PreActResNet18) or 'wrn' (WideResNet-`depth`-`widen`)
         width:int=64,               # PreActResNet18 width (8 with --tiny)
         depth:int=16, widen:int=4,  # WideResNet depth and widening factor (--arch wrn)
         source:str='fast',          # robust source: 'fast' (fast AT, FGSM-RS) or 'pgd' (PGD-7 AT)
         lams:str='0,1e-4,1e-3,5e-3,1e-2,1e-1', # distillation weights
         low_n:str='10,25,50,250',   # training images per class of the low-data runs
         parts:str='source,blocks,distill,lowdata', # stages after the source (which always runs)
         bs:int=None,                # batch size (default 256; 32 with --tiny)
         val_bs:int=1000,            # evaluation batch size
         fp16:bool=False,            # fastai's to_fp16 (grad scaler) for training, fp16 autocast for the evaluation
         bf16:bool=False,            # fastai's to_bf16 for training, bf16 autocast for the evaluation
         channels_last:bool=False,   # models in channels_last memory format
         src_epochs:int=None,        # override the planned source epochs
         tgt_epochs:int=None,        # override the planned target epochs (blocks and distillation)
         low_steps:int=None,         # override the planned optimizer steps of each low-data run
         scratch_lrs:str='3e-3,3e-2,0.3', # learning rates of PGD-7 AT from scratch in the low-data runs, a row each
         out:str=None,               # folder for results.json and results.md
         seed:int=0):
    "The paper study on one GPU in a fixed budget, printing the wall time of each stage and a results table."
    warnings.filterwarnings('ignore')
    t0 = time.time()
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if fp16 and bf16: raise SystemExit("gpu_study: give at most one of --fp16 and --bf16")
    if source not in ('fast', 'pgd'): raise SystemExit(f"gpu_study: --source must be 'fast' or 'pgd', got {source!r}")
    if arch not in ('preact18', 'wrn'): raise SystemExit(f"gpu_study: --arch must be 'preact18' or 'wrn', got {arch!r}")
    dtype = torch.float16 if fp16 else torch.bfloat16 if bf16 else torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if tiny: width, bs, val_bs = 8, bs or 32, 64
    bs = bs or 256
    lams_l, low_l = [float(v) for v in lams.split(',')], [int(v) for v in low_n.split(',')]
    lrs = [float(v) for v in scratch_lrs.split(',')]; n_lrs = len(lrs)
    if tiny: lams_l, low_l = lams_l[:1] + lams_l[-1:], [2, 4]
    parts = parts.split(',')
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    desc = f'PreActResNet18 width {width}' if arch == 'preact18' else f'WideResNet-{depth}-{widen}'
    print(f"# gpu_study: {name}; torch {torch.__version__}, fastai {fastai.__version__}, dtype {str(dtype)[6:]}, "
          f"{'channels_last' if channels_last else 'NCHW'}; {desc}; budget {budget_minutes:g} min", flush=True)
    def log(*a): print(f"[{time.time()-t0:6.1f}s]", *a, flush=True)
    def make_model(n_out):
        m = PreActResNet18(n_in=3, n_out=n_out, width=width) if arch == 'preact18' else WideResNet(depth, widen, n_in=3, n_out=n_out)
        return m.to(dev, memory_format=fmt)

    cifar = load_dataset('cifar10')
    split = class_split(cifar)
    src_d, tgt_full = select_classes(cifar, split.source), select_classes(cifar, split.target)
    if tiny: src_d, tgt_full = subsample_valid(subsample(src_d, 16), 8), subsample_valid(tgt_full, 8)
    tgt_d = subsample(tgt_full, 16) if tiny else tgt_full
    src_dls = task_dls(src_d, bs=bs, val_bs=val_bs, augment=True, seed=seed, device=dev, data_device='device')
    tgt_dls = lambda d=tgt_d, b=bs: task_dls(d, bs=b, val_bs=val_bs, seed=seed, device=dev, data_device='device')  # fresh per run: same shuffles
    times, res = {}, dict(settings=dict(device=name, torch=torch.__version__, fastai=fastai.__version__, dtype=str(dtype),
                                         channels_last=channels_last, model=desc, source=source, bs=bs, eps='8/255',
                                         attack='PGD-20, step 2/255, random start, all test images of the task'))
    log(f"data: source {src_d.n_train} train / {src_d.n_valid} test, target {tgt_d.n_train} train / {tgt_d.n_valid} test")

    # -- calibration: seconds per image of a training pass and of an attack step, on this device ----------------------
    t = time.time()
    cal_n = min(src_d.n_train, 20*bs)
    cal = task_dls(ArrayData(src_d.x_train[:cal_n], src_d.y_train[:cal_n], src_d.x_valid[:bs], src_d.y_valid[:bs],
                             src_d.classes, src_d.name), bs=bs, seed=seed, device=dev, data_device='device')
    learn = set_amp(Learner(cal, make_model(cal.c)), dtype)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)                                   # warm-up (cuDNN, allocator)
        sync(dev); tt = time.perf_counter(); learn.fit(1, 1e-3); sync(dev)
    n_seen = len(cal.train) * bs
    c_pass = (time.perf_counter() - tt) / n_seen            # a training step per image (validation of bs images included)
    x, y = cal.valid.one_batch()
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(dev.type, dtype=dtype)
    with ctx:
        pgd_attack(learn.model, x, y, EPS, steps=2, alpha=ALPHA, stats=cal)
        sync(dev); tt = time.perf_counter(); pgd_attack(learn.model, x, y, EPS, steps=5, alpha=ALPHA, stats=cal); sync(dev)
    c_step = (time.perf_counter() - tt) / (5 * len(y))      # one attack step (forward + input gradient) per image
    times['calibration'] = time.time() - t
    log(f"calibration: {1/c_pass:.0f} training images/s, {1/c_step:.0f} attack image-steps/s ({times['calibration']:.1f}s)")

    # -- the plan: epochs scaled by k so that the estimated total fits the budget ---------------------------------------
    m_src = 2 if source == 'fast' else 8
    n_s, n_t = src_d.n_train, tgt_d.n_train
    n_ev_s, n_ev_t = src_d.n_valid, tgt_d.n_valid
    ev = lambda n: n * 21 * c_step * 0.7   # PGD-20 on n images; dropping fooled examples saves about a third (estimate)
    def plan(k):
        p = dict(src_epochs=max(1, round(15*k)), tgt_epochs=max(1, round(8*k)), low_steps=max(10, round(300*k)))
        if src_epochs: p['src_epochs'] = src_epochs
        if tgt_epochs: p['tgt_epochs'] = tgt_epochs
        if low_steps: p['low_steps'] = low_steps
        if tiny: p = dict(src_epochs=src_epochs or 1, tgt_epochs=tgt_epochs or 1, low_steps=low_steps or 4)
        e, s = p['tgt_epochs'], p['low_steps']
        est = dict(source=p['src_epochs']*n_s*m_src*c_pass + ev(n_ev_s),
                   blocks=(('blocks' in parts) and (e*n_t*(0.1 + 0.45 + 0.65 + 1.0)*c_pass + 0.4*n_t*c_pass + 4*ev(n_ev_t))),
                   distill=(('distill' in parts) and (len(lams_l)*(e*n_t*1.05 + 0.4*n_t)*c_pass + len(lams_l)*ev(n_ev_t))),
                   lowdata=(('lowdata' in parts) and sum(s*min(bs, 4*n)*(0.1 + 8*n_lrs)*c_pass + (1+n_lrs)*ev(n_ev_t)
                                                         for n in low_l)))
        return p, {k_: float(v) for k_, v in est.items()}
    avail = budget_minutes*60 - (time.time() - t0) - 10     # 10 s for data set-up of the later stages
    lo, hi = 0.02, 1.0
    if sum(plan(hi)[1].values()) <= avail: k = hi
    else:
        for _ in range(30):
            mid = (lo + hi)/2
            lo, hi = (mid, hi) if sum(plan(mid)[1].values()) <= avail else (lo, mid)
        k = lo
    p, est = plan(k)
    res['plan'] = dict(k=round(k, 3), **p, estimated_s={k_: round(v, 1) for k_, v in est.items()})
    log(f"plan (k={k:.2f}): {p}; estimated seconds {res['plan']['estimated_s']} (total {sum(est.values()):.0f}s "
        f"of {avail:.0f}s left)")
    if sum(est.values()) > avail: log("WARNING: even the smallest plan exceeds the budget (the evaluations alone?)")

    # -- 1. source --------------------------------------------------------------------------------------------------------
    t = time.time()
    src_learn = train_source(src_dls, make_model, source, p['src_epochs'], dtype)
    src = src_learn.model.eval()
    res['source'] = dict(kind=source, epochs=p['src_epochs'], seconds=0., **evaluate(src_learn, dtype))
    times['source'] = res['source']['seconds'] = round(time.time() - t, 1)
    log(f"source: {res['source']}")

    # -- 2. block-by-block transfer ---------------------------------------------------------------------------------------
    if 'blocks' in parts:
        t, rows = time.time(), []
        for nr in (0, 1, 2, 'all'):
            set_seed(seed); ts = time.time()
            l = fit_quietly(transfer_learner(src, tgt_dls(), n_retrain=nr, metrics=accuracy), p['tgt_epochs'], 3e-3, dtype=dtype)
            rows.append(dict(n_retrain=str(nr), epochs=p['tgt_epochs'], seconds=round(time.time()-ts, 1), **evaluate(l, dtype)))
            log(f"blocks: {rows[-1]}")
        res['blocks'], times['blocks'] = rows, time.time() - t

    # -- 3. distillation sweep --------------------------------------------------------------------------------------------
    if 'distill' in parts:
        t, rows = time.time(), []
        for lam in lams_l:
            set_seed(seed); ts = time.time()
            l = transfer_learner(src, tgt_dls(), n_retrain='all', metrics=accuracy)
            fit_quietly(l, p['tgt_epochs'], 3e-3, [FeatureDistillation(src, lam=lam, warmup_epochs=min(1, p['tgt_epochs']-1),
                                                                       precompute=True)], dtype)
            rows.append(dict(lam=lam, epochs=p['tgt_epochs'], seconds=round(time.time()-ts, 1), **evaluate(l, dtype)))
            log(f"distill: {rows[-1]}")
        res['distill'], times['distill'] = rows, time.time() - t

    # -- 4. low-data regime -----------------------------------------------------------------------------------------------
    if 'lowdata' in parts:
        t, rows = time.time(), []
        for n in low_l:
            b = min(bs, 4*n)
            d_n = subsample(tgt_full, n, seed=seed)
            ep = max(1, round(p['low_steps'] / max(1, d_n.n_train // b)))
            # the baseline at several learning rates (a row each): its best is the fair comparison
            for method, lr in [('robust source, frozen (head only)', 3e-3)] + [('PGD-7 AT from scratch', x) for x in lrs]:
                set_seed(seed); ts = time.time()
                dl_n = tgt_dls(d_n, b)
                if method.startswith('robust'): l = fit_quietly(transfer_learner(src, dl_n, n_retrain=0, metrics=accuracy), ep, lr, dtype=dtype)
                else: l = fit_quietly(Learner(dl_n, make_model(dl_n.c), metrics=accuracy), ep, lr,
                                      [PGDTraining(EPS, steps=7, alpha=ALPHA)], dtype)
                rows.append(dict(n_per_class=n, method=f"{method}, lr {lr:g}", epochs=ep, seconds=round(time.time()-ts, 1), **evaluate(l, dtype)))
                log(f"lowdata: {rows[-1]}")
        res['lowdata'], times['lowdata'] = rows, time.time() - t

    # -- report -----------------------------------------------------------------------------------------------------------
    import pandas as pd
    times['total'] = time.time() - t0
    res['times_s'] = {k_: round(v, 1) for k_, v in times.items()}
    if out:   # the numbers first, whatever happens to the report below
        o = Path(out); o.mkdir(parents=True, exist_ok=True)
        (o/'results.json').write_text(json.dumps(res, indent=1))
    md = [f"settings: {res['settings']}", f"plan: {res['plan']}", '', '### wall time per stage (s): planned vs measured',
          pd.DataFrame([dict(stage=s, planned=res['plan']['estimated_s'].get(s, ''), measured=round(v, 1)) for s, v in times.items()]).to_markdown(index=False),
          '', '### source', pd.DataFrame([res['source']]).to_markdown(index=False)]
    for k_ in ('blocks', 'distill', 'lowdata'):
        if k_ in res: md += ['', f'### {k_}', pd.DataFrame(res[k_]).to_markdown(index=False)]
    text = '\n'.join(md) + '\n'
    print('\n' + text, flush=True)
    if out: (o/'results.md').write_text(text)
    within = times['total'] <= budget_minutes*60
    print(f"# total {times['total']:.1f}s, budget {budget_minutes*60:.0f}s: {'within' if within else 'OVER'}", flush=True)
