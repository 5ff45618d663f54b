"""GPU forms of the benchmarks (issue 15, part 3), each measured side by side in one run, on CIFAR-10 with a
PreActResNet18 of full width (64):

  pgd        PGD-20 (L-inf 8/255, step 2/255, random start) robust-accuracy evaluation on the test images: ours
             (`Learner.robust_validate`, dropping fooled examples, and without dropping) against torchattacks' `PGD`
             (optional: `pip install --no-deps torchattacks==3.5.1`) and a minimal PyTorch loop; images/s and accuracy.
             The model is fast-AT-trained first (`--eval-epochs`), so robust accuracy is in the informative range.
             Every method attacks the same images, those the model classifies right (ours skips the others, which
             are not robust anyway); torchattacks on all images, as it is often run, is shown in a row of its own.
  adv        one epoch each of natural training, free AT (m=4; its epoch counted as the paper does, one pass with m
             replays = m epochs), fast AT, PGD-7 AT and TRADES (10 steps), as ratios to the natural epoch.
  transfer   head training with and without the feature cache; distillation against plain fine-tuning.
  throughput images/s of natural training: fastai + our data pipeline (data in host memory, and on the GPU; fastai's Adam
             and torch's fused Adam) against a plain PyTorch loop over the same model, data and augmentation.

    python bench/bench_gpu.py                          # on a GPU (an estimate of about 3 minutes on one H200: not yet run)
    python bench/bench_gpu.py --bf16 --channels_last   # mixed precision (fastai's to_bf16 / autocast) and NHWC
    python bench/bench_gpu.py --compile                # also torch.compile'd model for the evaluation (against eager;
                                                       # GPU only: inductor's CPU code crashed on a dynamic batch size here)
    OMP_NUM_THREADS=1 python bench/bench_gpu.py --device cpu --tiny   # the same code at tiny sizes (well under a minute)

Times are wall times with `torch.cuda.synchronize()` around each region, after a warm-up; `--reps` timed runs, median.
Targets (issue 15): PGD evaluation >= 1.5x torchattacks at equal or lower robust accuracy; free AT epoch <= 1.3x a
natural epoch; natural training >= 0.8x the plain loop's images/s.
"""
import contextlib, json, statistics, sys, time, warnings
from functools import partial
from pathlib import Path
import torch, torch.nn as nn, torch.nn.functional as F
import fastai
from fastcore.script import call_parse
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastai.torch_core import TensorImage
import fastai.callback.all  # noqa: F401  (no_bar, to_fp16, to_bf16)
from fastai.metrics import accuracy
sys.path.insert(0, str(Path(__file__).parent))
from _timers import EpochTimer
from rtl_fastai.core import normalize_stats, NormalizeInput, plain
from rtl_fastai.data.all import load_dataset, select_classes, subsample, subsample_valid, class_split, task_dls, ArrayData, FlipPadCrop
from rtl_fastai.models import PreActResNet18
from rtl_fastai.callback.adv_valid import RobustAccuracy  # noqa: F401  (Learner.robust_validate)
from rtl_fastai.callback.adv_train import PGDTraining, FreeAdvTraining, FastAdvTraining, TRADESTraining
from rtl_fastai.callback.transfer import transfer_learner
from rtl_fastai.callback.distill import FeatureDistillation

EPS, ALPHA = 8/255, 2/255


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)

def timed(f, dev, reps=1, warmup=True):
    "Median wall time of `reps` runs of `f` (after one untimed run if `warmup`) and the last result."
    if warmup: f()
    ts, r = [], None
    for _ in range(reps):
        sync(dev); t = time.perf_counter(); r = f(); sync(dev); ts.append(time.perf_counter() - t)
    return statistics.median(ts), r

def autocast(dev, dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(dev.type, dtype=dtype)

def set_amp(learn, dtype):
    if dtype == torch.float16: learn.to_fp16()
    elif dtype == torch.bfloat16: learn.to_bf16()
    return learn

def minimal_pgd(model, p, y, eps, alpha, steps):
    "The textbook loop (Madry et al.): uniform start, signed gradient step, projection, [0,1] clamp."
    d = (p + torch.empty_like(p).uniform_(-eps, eps)).clamp(0, 1) - p
    for _ in range(steps):
        d.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(p + d), y), d)
        d = (d.detach() + alpha*g.sign()).clamp(-eps, eps)
        d = (p + d).clamp(0, 1) - p
    return p + d


@call_parse
def main(device:str=None,         # 'cuda', 'cuda:N' or 'cpu' (default: cuda if available)
         tiny:bool=False, # tiny sizes, to try the script on the CPU
         parts:str='pgd,adv,transfer,throughput', # which benchmarks, comma-separated
         width:int=None,          # PreActResNet18 width (default 64; 8 with --tiny)
         n_eval:int=None,         # test images of the PGD evaluation (default 10000; 64 with --tiny)
         n_train:int=None,        # training images of the epoch benchmarks (default 10000; 128 with --tiny)
         eval_epochs:int=None,    # fast-AT epochs on all training images for the model the evaluation attacks (default 2; 0 with --tiny)
         n_target:int=None,       # training images per target class (vehicles) in the transfer benchmark (default 2500; 16 with --tiny)
         bs:int=None,             # training batch size (default 256; 32 with --tiny)
         val_bs:int=None,         # evaluation batch size (default 1000; 64 with --tiny)
         reps:int=None,           # timed runs per measurement (median; default 2; 1 with --tiny)
         fp16:bool=False, # fp16 autocast (fastai's to_fp16 with its grad scaler for training)
         bf16:bool=False, # bf16 autocast (fastai's to_bf16 for training)
         channels_last:bool=False, # models in channels_last memory format
         compile:bool=False, # also time a torch.compile'd model for the evaluation/attacks, against eager
         cudnn_benchmark:bool=False, # torch.backends.cudnn.benchmark = True
         out:str=None,            # write the results as JSON here
         seed:int=0):
    "GPU benchmarks of rtl_fastai, each printing ratios measured side by side in one run."
    warnings.filterwarnings('ignore')
    t_start = time.time()
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if fp16 and bf16: raise SystemExit("bench_gpu: give at most one of --fp16 and --bf16")
    dtype = torch.float16 if fp16 else torch.bfloat16 if bf16 else torch.float32
    T = tiny
    width = width or (8 if T else 64); n_eval = n_eval or (64 if T else 10000); n_train = n_train or (128 if T else 10000)
    eval_epochs = (0 if T else 2) if eval_epochs is None else eval_epochs
    n_target = n_target or (16 if T else 2500); bs = bs or (32 if T else 256); val_bs = val_bs or (64 if T else 1000)
    reps = reps or (1 if T else 2)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    parts = parts.split(',')
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    print(f"# bench_gpu: {name}; torch {torch.__version__}, fastai {fastai.__version__}, dtype {str(dtype)[6:]}, "
          f"{'channels_last' if channels_last else 'NCHW'}, cudnn.benchmark={cudnn_benchmark}, "
          f"tf32 matmul={torch.backends.cuda.matmul.allow_tf32} conv={torch.backends.cudnn.allow_tf32}", flush=True)
    print(f"# width {width}, n_eval {n_eval}, n_train {n_train}, bs {bs}, val_bs {val_bs}, reps {reps}, parts {parts}", flush=True)
    res = dict(device=name, torch=torch.__version__, fastai=fastai.__version__, dtype=str(dtype), channels_last=channels_last)
    def log(*a): print(f"[{time.time()-t_start:6.1f}s]", *a, flush=True)

    cifar = load_dataset('cifar10')
    def model_(n_out=10):
        torch.manual_seed(seed)
        return PreActResNet18(n_in=3, n_out=n_out, width=width).to(dev, memory_format=fmt)

    # -- the model the evaluation and the transfer attack: fast AT on all classes --------------------------------------
    ev = subsample_valid(cifar, n_eval // 10) if n_eval < len(cifar.y_valid) else cifar
    if T: ev = subsample(ev, n_train // 10)
    dls = task_dls(ev, bs=bs, val_bs=val_bs, augment=True, seed=seed, device=dev)
    src = model_()
    if eval_epochs and ('pgd' in parts or 'transfer' in parts):
        learn = set_amp(Learner(dls, src, metrics=accuracy), dtype)
        t = time.perf_counter()
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(eval_epochs, 2e-3, cbs=[FastAdvTraining(EPS)])
        log(f"source: fast AT, {eval_epochs} epochs on {len(dls.train_ds)} images in {time.perf_counter()-t:.1f}s; "
            f"valid acc {learn.recorder.values[-1][2]:.3f}")
    src.eval()

    # -- (a) PGD-20 evaluation ------------------------------------------------------------------------------------------
    if 'pgd' in parts:
        try: import torchattacks
        except ImportError: torchattacks = None
        mean, std = (s.to(dev) for s in normalize_stats(dls))
        learn = Learner(dls, src)
        batches = [(plain(x), plain(y)) for x, y in dls.valid]
        # the baselines get the loader's memory format, as ours does (a channels-last model converts it in its first conv)
        pix = [(x*std + mean, y) for x, y in batches]
        n = sum(len(y) for _, y in batches)
        def count(m, xa, y):
            with torch.no_grad(), autocast(dev, dtype): return (m(xa).argmax(1) == y).sum()
        # the same work for every method: ours attacks only the images the model classifies right (one it gets wrong
        # is not robust), so the baselines attack those too; torchattacks on all images, as it is often run, is a row
        # of its own, not the target's
        with torch.no_grad(), autocast(dev, dtype):
            pm0 = nn.Sequential(NormalizeInput(mean, std), src).eval()
            pix_cc = [(p[k], y[k]) for p, y in pix for k in [pm0(p).argmax(1) == y]]
        def methods_for(model, tag='', ours_compile=False):
            "The methods on `model`; ours with the library's `compile=` option on `src` instead when `ours_compile`"
            pm = nn.Sequential(NormalizeInput(mean, std), model).eval()
            lr_ = Learner(dls, src if ours_compile else model)
            kw = dict(eps=EPS, steps=20, alpha=ALPHA, show_progress=False, compile=ours_compile)
            ms = {f'ours (drop fooled){tag}': lambda: lr_.robust_validate(**kw)['robust_acc'],
                  f'ours (no dropping){tag}': lambda: lr_.robust_validate(**kw, drop_fooled=False)['robust_acc'],
                  f'minimal loop{tag}': lambda: (sum(count(pm, minimal_pgd(pm, p, y, EPS, ALPHA, 20), y) for p, y in pix_cc)/n).item()}
            if torchattacks is not None:
                atk = torchattacks.PGD(pm, eps=EPS, alpha=ALPHA, steps=20, random_start=True)
                ms[f'torchattacks PGD{tag}'] = lambda: (sum(count(pm, atk(p, y), y) for p, y in pix_cc)/n).item()
                if not tag: ms['torchattacks PGD, all images'] = lambda: (sum(count(pm, atk(p, y), y) for p, y in pix)/n).item()
            return ms
        methods = methods_for(src)
        if compile:
            csrc = torch.compile(src)
            methods.update(methods_for(csrc, ' [compiled]', ours_compile=True))
        with torch.no_grad(), autocast(dev, dtype): clean = (sum((src(x).argmax(1) == y).sum() for x, y in batches)/n).item()
        rows = {}
        for k, f in methods.items():
            def run(f=f):
                torch.manual_seed(seed)
                with autocast(dev, dtype): return f()
            try: t0 = time.perf_counter(); run(); t_first = time.perf_counter() - t0   # warm-up (compilation included)
            except Exception as e:   # compilation needs a C compiler and triton: report, and time the rest
                if not k.endswith('[compiled]'): raise
                log(f"  {k:34s} failed: {type(e).__name__}: {str(e)[:300]}"); continue
            dt, acc = timed(run, dev, reps, warmup=False)
            rows[k] = dict(images_per_s=n/dt, seconds=dt, robust_acc=acc, first_run_s=t_first)
            log(f"  {k:34s} {n/dt:10.1f} img/s  robust acc {acc:.4f}  (first run {t_first:.1f}s)")
        print(f"\n## PGD-20 L-inf eps 8/255 step 2/255, {n} CIFAR-10 test images, PreActResNet18 width {width}, "
              f"clean acc {clean:.4f}, {str(dtype)[6:]}; every method attacks the {sum(len(y) for _, y in pix_cc)} "
              "images classified right, except the 'all images' row")
        if dtype == torch.float16:
            print("(fp16: the baselines' mean cross-entropy is not loss-scaled, so their input gradients may underflow, "
                  "a weaker attack with a higher robust accuracy; compare speeds in bf16 or fp32)")
        print(f"| method | images/s | robust acc | ratio to ours (drop) |\n|---|---|---|---|")
        base = rows['ours (drop fooled)']['images_per_s']
        for k, r in rows.items(): print(f"| {k} | {r['images_per_s']:.1f} | {r['robust_acc']:.4f} | {r['images_per_s']/base:.2f}x |")
        if 'torchattacks PGD' in rows:
            ra, rt = rows['ours (drop fooled)'], rows['torchattacks PGD']
            r1 = ra['images_per_s']/rt['images_per_s']
            print(f"ours (drop) / torchattacks: {r1:.2f}x (target >= 1.5x: {'met' if r1 >= 1.5 else 'NOT met'}); robust acc "
                  f"{100*(ra['robust_acc']-rt['robust_acc']):+.2f} points (target <= 0: {'met' if ra['robust_acc'] <= rt['robust_acc'] else 'NOT met'})")
            r_all = ra['images_per_s']/rows['torchattacks PGD, all images']['images_per_s']
            print(f"ours (drop) / torchattacks on all {n} images, as it is often run: {r_all:.2f}x (not the target's "
                  "measure: it also counts the images ours does not attack)")
        else: print("torchattacks is not installed: `pip install --no-deps torchattacks==3.5.1` for that column")
        r2 = rows['ours (no dropping)']['images_per_s']/rows['minimal loop']['images_per_s']
        print(f"ours (no dropping) / minimal loop: {r2:.2f}x")
        ra_ = rows['ours (drop fooled)']['robust_acc']
        print(f"precondition of the dropping gain: most attacked images are fooled: robust acc {ra_:.3f} of clean {clean:.3f} "
              f"({'yes' if ra_ < 0.5*clean else 'NO: most attacked images survive, so dropping the fooled ones saves little'})")
        if compile:
            for k in [k for k in rows if not k.endswith('[compiled]')]:
                c = rows.get(k + ' [compiled]')
                if c: print(f"compiled / eager, {k}: {c['images_per_s']/rows[k]['images_per_s']:.2f}x (first compiled run {c['first_run_s']:.1f}s)")
        res['pgd'] = dict(clean_acc=clean, n=n, rows=rows)

    # -- (b) adversarial-training epochs --------------------------------------------------------------------------------
    if 'adv' in parts:
        d = subsample(cifar, n_train // 10)
        tdls = task_dls(ArrayData(d.x_train, d.y_train, d.x_valid[:val_bs], d.y_valid[:val_bs], d.classes, d.name),
                        bs=bs, augment=True, seed=seed, device=dev)
        m = 4
        meths = {'natural (warm-up)': None, 'natural': None, f'free AT (m={m})': lambda: FreeAdvTraining(EPS, replays=m),
                 'fast AT (FGSM-RS)': lambda: FastAdvTraining(EPS), 'PGD-7 AT': lambda: PGDTraining(EPS, steps=7, alpha=ALPHA),
                 'TRADES (10 steps)': lambda: TRADESTraining(EPS, steps=10, alpha=ALPHA)}
        rows = {}
        for k, cbf in meths.items():
            learn = set_amp(Learner(tdls, model_(), metrics=accuracy), dtype)
            timer = EpochTimer()
            with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[timer] + ([cbf()] if cbf else []))
            sync(dev)
            t = timer.times[0]
            if k.startswith('free'): t = t / m   # the paper counts one pass with m replays as m epochs
            rows[k] = dict(epoch_s=t, pass_s=timer.times[0])
            log(f"  {k:22s} epoch {t:8.2f}s" + (f" (one pass with {m} replays {timer.times[0]:.2f}s)" if k.startswith('free') else ''))
        rows.pop('natural (warm-up)')
        nat = rows['natural']['epoch_s']
        print(f"\n## one training epoch over {len(tdls.train_ds)} CIFAR-10 images (bs {bs}, augmented), PreActResNet18 width {width}, "
              f"{str(dtype)[6:]}\n| method | s/epoch | ratio to natural |\n|---|---|---|")
        for k, r in rows.items(): print(f"| {k} | {r['epoch_s']:.2f} | {r['epoch_s']/nat:.2f}x |")
        rf = rows[f'free AT (m={m})']['epoch_s']/nat
        print(f"free AT epoch / natural epoch: {rf:.2f}x (target <= 1.3x: {'met' if rf <= 1.3 else 'NOT met'})")
        res['adv'] = rows

    # -- (c) feature cache and distillation -----------------------------------------------------------------------------
    if 'transfer' in parts:
        tgt = subsample(subsample_valid(select_classes(cifar, class_split(cifar).target), val_bs // 4), n_target)
        rows = {}
        def fit_t(key, make, epochs, cbs=()):
            "Training time of each epoch (validation excluded): the first (a cache build, a precomputation) and the last"
            tdl = task_dls(tgt, bs=bs, val_bs=val_bs, seed=seed, device=dev)   # fresh: same shuffles for each row
            torch.manual_seed(seed)
            learn = set_amp(make(tdl), dtype)
            timer = EpochTimer(); timer.order = -10   # its epochs start before other callbacks': a cache build is in the first
            sync(dev); t = time.perf_counter()
            with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-3, cbs=[timer, *cbs])
            sync(dev); dt = time.perf_counter() - t
            rows[key] = dict(seconds=dt, first_s=timer.times[0], epoch_s=timer.times[-1], valid_acc=learn.recorder.values[-1][2])
            log(f"  {key:36s} fit {dt:8.2f}s  first epoch {timer.times[0]:7.2f}s  last epoch {timer.times[-1]:7.2f}s  "
                f"valid acc {rows[key]['valid_acc']:.3f}")
        ep = 2 if T else 3   # the last epoch is the steady state: what a longer fit costs per epoch
        fit_t('warm-up', lambda d: transfer_learner(src, d, n_retrain=0, cache=False, metrics=accuracy), 1)
        fit_t('head only, no cache', lambda d: transfer_learner(src, d, n_retrain=0, cache=False, metrics=accuracy), ep)
        fit_t('head only, feature cache', lambda d: transfer_learner(src, d, n_retrain=0, cache=True, metrics=accuracy), ep)
        fit_t('fine-tuning (all blocks)', lambda d: transfer_learner(src, d, n_retrain='all', metrics=accuracy), ep)
        fit_t('distillation lam=5e-3', lambda d: transfer_learner(src, d, n_retrain='all', metrics=accuracy), ep,
              [FeatureDistillation(src, lam=5e-3)])
        fit_t('distillation lam=5e-3, precomputed', lambda d: transfer_learner(src, d, n_retrain='all', metrics=accuracy), ep,
              [FeatureDistillation(src, lam=5e-3, precompute=True)])
        rows.pop('warm-up')
        ks = list(rows)
        print(f"\n## transfer to vehicles ({len(tgt.y_train)} training images, bs {bs}, {ep} epochs), {str(dtype)[6:]}; "
              "training time per epoch, validation excluded: the first epoch (it builds the cache or precomputes the "
              "source features) and the last\n| run | first epoch s | last epoch s | fit s | valid acc |\n|---|---|---|---|---|")
        for k, r in rows.items(): print(f"| {k} | {r['first_s']:.2f} | {r['epoch_s']:.2f} | {r['seconds']:.2f} | {r['valid_acc']:.3f} |")
        e = {k: r['epoch_s'] for k, r in rows.items()}
        print(f"head training: feature cache speed-up per epoch {e[ks[0]]/e[ks[1]]:.2f}x (its first epoch, the build: "
              f"{rows[ks[1]]['first_s']/rows[ks[0]]['first_s']:.2f}x of an uncached one)")
        print(f"distillation / plain fine-tuning, per epoch: {e[ks[3]]/e[ks[2]]:.2f}x; precomputed: {e[ks[4]]/e[ks[2]]:.2f}x "
              f"(its first epoch, the precomputation: {rows[ks[4]]['first_s']/rows[ks[2]]['first_s']:.2f}x)")
        res['transfer'] = rows

    # -- (d) natural-training throughput: fastai against a plain loop ---------------------------------------------------
    if 'throughput' in parts:
        d = subsample(cifar, n_train // 10)
        d = ArrayData(d.x_train, d.y_train, d.x_valid[:val_bs], d.y_valid[:val_bs], d.classes, d.name)
        n = len(d.y_train) - len(d.y_train) % bs
        rows = {}
        def fastai_run(key, on_gpu, fused):
            tdl = task_dls(d, bs=bs, augment=True, seed=seed, device=dev, data_device='device' if on_gpu else None)
            kw = dict(opt_func=partial(OptimWrapper, opt=partial(torch.optim.Adam, fused=dev.type == 'cuda'))) if fused else {}
            def once():
                learn = set_amp(Learner(tdl, model_(), **kw), dtype)
                timer = EpochTimer()
                with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[timer])
                return timer.times[0]
            once()
            rows[key] = n / statistics.median([once() for _ in range(reps)])
            log(f"  {key:44s} {rows[key]:10.1f} img/s")
        fastai_run('fastai, data in host memory, fastai Adam', False, False)
        fastai_run('fastai, data on the GPU, fastai Adam', True, False)
        fastai_run('fastai, data on the GPU, torch fused Adam', True, True)
        # the plain loop: same model, data on the GPU, same augmentation op, torch's Adam, constant lr
        mean, std = (s.to(dev) for s in normalize_stats(task_dls(d, bs=bs, device=dev)))
        x8, yy = d.x_train.to(dev), d.y_train.to(dev)
        aug = FlipPadCrop()
        def plain_epoch():
            model = model_().train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({'fused': True} if dev.type == 'cuda' else {}))
            scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
            perm = torch.randperm(len(yy), device=dev)
            sync(dev); t = time.perf_counter()
            for i in range(0, n, bs):
                idx = perm[i:i+bs]
                xb = ((plain(aug(TensorImage(x8[idx].float()/255), split_idx=0)) - mean)/std).contiguous(memory_format=fmt)
                with autocast(dev, dtype): loss = F.cross_entropy(model(plain(xb)), yy[idx])
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
            sync(dev); return time.perf_counter() - t
        plain_epoch()
        rows['plain PyTorch loop (data on the GPU, fused Adam)'] = n / statistics.median([plain_epoch() for _ in range(reps)])
        log(f"  {'plain PyTorch loop':44s} {rows['plain PyTorch loop (data on the GPU, fused Adam)']:10.1f} img/s")
        base = rows['plain PyTorch loop (data on the GPU, fused Adam)']
        print(f"\n## natural training, {n} CIFAR-10 images/epoch (bs {bs}, flip + pad-crop), PreActResNet18 width {width}, "
              f"{str(dtype)[6:]}\n| loop | images/s | ratio to plain loop |\n|---|---|---|")
        for k, r in rows.items(): print(f"| {k} | {r:.1f} | {r/base:.2f}x |")
        r = rows['fastai, data in host memory, fastai Adam']/base
        print(f"fastai (as users run it) / plain loop: {r:.2f}x (target >= 0.8x: {'met' if r >= 0.8 else 'NOT met'})")
        res['throughput'] = rows

    print(f"\n# total {time.time()-t_start:.1f}s", flush=True)
    if out: Path(out).write_text(json.dumps(res, indent=1, default=str))
