"""Determinism (issue 8, part 6): with a fixed seed, two runs of the main job (`rtl-fastai run`) on CPU print
identical tables. Wall times differ between runs, so the `seconds` column and the timings in parentheses are
removed before comparing; everything else, every accuracy of every row and both source models, must be equal, and
so must `results.csv` without its `seconds` column.
"""
import os, re, subprocess, sys
from pathlib import Path
import pandas as pd

ARGS = ['run', '--epochs', '2', '--no-curve', '--seed', '0']


def _run(out:Path):
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', MPLBACKEND='Agg', CUDA_VISIBLE_DEVICES='')
    cmd = [sys.executable, '-c', 'import sys; from rtl_fastai.cli import main; sys.exit(main())', *ARGS, '--out', str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _without_times(stdout:str) -> list:
    "The printed lines without wall times: the `seconds` column, `(1.2s)`, the total and the output paths."
    lines, in_table = [], False
    for l in stdout.splitlines():
        if l.startswith('rtl-fastai run:') or l.startswith('total '): continue  # results folder, total time and paths
        l = re.sub(r' \(\d+\.\d+s\)$', '', l)  # source models: "... PGD 46.46% (1.4s)"
        if re.match(r'\s*method\s+clean_acc\s+pgd_acc\s+seconds\s*$', l): in_table = True
        if in_table and l.strip():
            l = re.sub(r'\s+\S+\s*$', '', l)  # last column: seconds
        lines.append(l.rstrip())
    return lines


def test_two_runs_print_identical_tables(tmp_path):
    out1, out2 = _run(tmp_path/'a'), _run(tmp_path/'b')
    t1, t2 = _without_times(out1), _without_times(out2)
    assert any('robust source, frozen (head only)' in l for l in t1), out1  # the table was printed
    assert any(l.startswith('robust source model: clean') for l in t1), out1
    assert t1 == t2, '\n'.join(f"{a!r}\n{b!r}" for a, b in zip(t1, t2) if a != b)
    r1, r2 = (pd.read_csv(p/'run_001'/'results.csv') for p in (tmp_path/'a', tmp_path/'b'))
    pd.testing.assert_frame_equal(r1.drop(columns='seconds'), r2.drop(columns='seconds'))
