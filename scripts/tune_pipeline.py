#!/usr/bin/env python
"""The whole default pipeline on its validation split, with some defaults overridden (issue 13's search):
`run_pipeline(holdout=100, curve=False)`, 100 training images per class held out and evaluated, the test images unused.

    OMP_NUM_THREADS=1 python scripts/tune_pipeline.py '{"source_epochs": 12}' [SEEDS] [FIRST_SEED]

Prints the table with its verdicts (mean ± std over the seeds) and the wall time."""
import sys, json, time, torch
torch.set_num_threads(1)
from rtl_fastai.pipeline import DEFAULTS, run_pipeline, format_table
over = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
DEFAULTS['mnist'].update(over)
t = time.time()
res, _, info = run_pipeline(holdout=100, seeds=seeds, seed=seed, curve=False, log=None)
print(f"overrides {over}, seeds {seed}..{seed+seeds-1}, {time.time()-t:.0f} s")
print(f"robust source: clean {100*info['robust']['clean_acc']:.1f}%, PGD {100*info['robust']['pgd_acc']:.1f}%")
print(format_table(res, times=True), flush=True)
