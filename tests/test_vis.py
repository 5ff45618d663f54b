"Pictures: show_adversarial, robust curves, block study, explorer (rtl_fastai.vis). Small and fast."
import types
import pytest, torch, torch.nn as nn, pandas as pd
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from fastai.vision.all import Learner, accuracy, set_seed
from rtl_fastai.data.all import task_dls
from rtl_fastai.models import SmallCNN
from rtl_fastai.vis import (show_adversarial, adversarial_examples, plot_robust_curve, plot_block_study,
                            adversarial_explorer, AdversarialExplorer, can_show_widgets)


@pytest.fixture(scope='module')
def learn():
    set_seed(0)
    dls = task_dls('digits', bs=64, seed=0, device='cpu')
    l = Learner(dls, SmallCNN(n_in=1, n_out=10, widths=(8, 16)), metrics=accuracy)
    with l.no_bar(), l.no_logging(): l.fit_one_cycle(1, 1e-2)
    l.model.eval()
    return l


def _preds(r, key): return r[key].argmax(1).tolist()


def test_grid_axes_titles_colours(learn):
    fig = show_adversarial(learn, n=3, eps=0.2, steps=5, seed=1)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 9
    r = adversarial_examples(learn, n=3, eps=0.2, steps=5, seed=1)
    vocab = learn.dls.vocab
    for i in range(3):
        clean, adv, pert = fig.axes[3*i:3*i+3]
        y = r['y'][i].item()
        for ax, key in ((clean, 'probs'), (adv, 'adv_probs')):
            c = r[key][i].argmax().item()
            assert f"pred {vocab[c]} ({r[key][i, c].item():.0%})" in ax.get_title()
            assert ax.title.get_color() == ('green' if c == y else 'red')
        assert clean.get_title().startswith(f"true {vocab[y]}")
        assert pert.get_title().startswith('perturbation ×2.5')  # 0.5/eps
    assert 'eps = 0.2' in fig._suptitle.get_text() and 'pixel units' in fig._suptitle.get_text()
    assert len(show_adversarial(learn, n=2, eps=0.2, probs=True, k=3).axes) == 8
    assert plt.get_fignums() == []  # nothing left in pyplot


def test_images_and_perturbation_pixels(learn):
    r = adversarial_examples(learn, n=4, eps=0.2, steps=5, seed=0)
    assert r['delta'].abs().max() <= 0.2 + 1e-5
    assert r['adv_pixels'].min() >= 0 and r['adv_pixels'].max() <= 1
    fig = show_adversarial(learn, n=1, eps=0.2, steps=5, seed=0)
    shown = fig.axes[2].images[0].get_array()
    torch.testing.assert_close(torch.tensor(shown.data, dtype=torch.float32),
                               (0.5 + 2.5*r['delta'][0, 0]).clamp(0, 1).float())


def test_model_state_untouched(learn):
    m = learn.model
    m.train(); m[1].eval()
    modes = [x.training for x in m.modules()]
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    for p in m.parameters(): p.grad = None  # fastai's training leaves zeroed .grad tensors
    p0 = next(m.parameters()); p0.requires_grad_(False)
    rng = torch.get_rng_state()
    show_adversarial(learn, n=2, eps=0.2, steps=3, seed=3, probs=True)
    AdversarialExplorer(learn, eps=0.1).redraw(eps=0.2, steps=2, idx=1)
    assert [x.training for x in m.modules()] == modes
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())
    assert p0.requires_grad is False
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded picture does not touch the global RNG
    p0.requires_grad_(True); m.eval()


def test_seed_reproducible_and_given_batch(learn):
    x, y = learn.dls.valid.one_batch()
    a = adversarial_examples(learn, batch=(x, y), idxs=[5, 2], eps=0.2, steps=3, seed=7)
    b = adversarial_examples(learn, batch=(x, y), idxs=[5, 2], eps=0.2, steps=3, seed=7)
    torch.testing.assert_close(a['x_adv'], b['x_adv'])
    assert a['y'].tolist() == [y[5].item(), y[2].item()]
    assert len(show_adversarial(learn, dl=learn.dls.train, n=2, eps=0.1, steps=2).axes) == 6


def test_rgb_model_with_stats_no_dls():
    "3-channel images, normalization given as stats, an object with only `.model`"
    torch.manual_seed(0)
    mean, std = torch.tensor([.4, .5, .6]).view(1, 3, 1, 1), torch.tensor([.2, .25, .3]).view(1, 3, 1, 1)
    p = torch.rand(4, 3, 16, 16)
    x, y = (p - mean)/std, torch.randint(0, 3, (4,))
    lrn = types.SimpleNamespace(model=nn.Sequential(nn.Flatten(), nn.Linear(3*16*16, 3)).eval())
    fig = show_adversarial(lrn, batch=(x, y), n=2, eps=8/255, steps=2, stats=(mean, std))
    assert len(fig.axes) == 6
    assert fig.axes[0].images[0].get_array().shape == (16, 16, 3)
    torch.testing.assert_close(torch.tensor(fig.axes[0].images[0].get_array().data).float(),
                               p[0].permute(1, 2, 0), atol=1e-5, rtol=0)
    assert 'eps = 8/255' in fig._suptitle.get_text()
    assert fig.axes[0].get_title().startswith(f'true {int(y[0])}')


@pytest.mark.parametrize('kw,name', [(dict(n=0), '`n`'), (dict(n=-2), '`n`'), (dict(n=1.5), '`n`'), (dict(n=10_000), '`n`'),
                                     (dict(eps=-0.1), '`eps`'), (dict(eps=8), '`eps`'), (dict(steps=0), '`steps`'),
                                     (dict(norm='l3'), '`norm`'), (dict(idxs=[10_000]), '`idxs`'), (dict(k=0), '`k`'),
                                     (dict(batch=torch.zeros(3)), '`batch`')])
def test_show_adversarial_bad_inputs(learn, kw, name):
    with pytest.raises(ValueError, match=name): show_adversarial(learn, **kw)


def test_explorer_fallback_and_redraw(learn):
    assert can_show_widgets() is False
    fig = adversarial_explorer(learn, eps=0.2, max_eps=0.5, idx=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    from rtl_fastai.callback.adv_valid import in_random_order   # the default batch: a seeded random sample
    assert fig.axes[0].get_title().startswith(f"true {learn.dls.vocab[in_random_order(learn.dls.valid).one_batch()[1][3].item()]}")
    ex = AdversarialExplorer(learn, eps=0.2, max_eps=0.5)
    f = ex.redraw(eps=0.05, steps=4, idx=7)
    assert (ex.eps, ex.steps, ex.idx, ex.n_draws) == (0.05, 4, 7, 1) and len(f.axes) == 4
    assert 'eps = 0.05' in f._suptitle.get_text() and 'PGD-4' in f._suptitle.get_text()
    ex.redraw(steps=2)  # other values kept
    assert (ex.eps, ex.steps, ex.idx) == (0.05, 2, 7)
    with pytest.raises(ValueError, match='`idx`'): ex.redraw(idx=-1)
    with pytest.raises(ValueError, match='`eps`'): ex.redraw(eps=-0.5)
    with pytest.raises(ValueError, match='`max_eps`'): AdversarialExplorer(learn, max_eps=2)
    with pytest.raises(ValueError, match='`idx`'): AdversarialExplorer(learn, idx=10_000)


def test_explorer_widgets_redraw_on_change(learn):
    box = adversarial_explorer(learn, interactive=True, eps=0.2, max_eps=0.5, steps=3)
    ex = box.explorer
    assert ex.eps_slider.max == 0.5 and ex.steps_slider.value == 3 and len(ex.picker.options) == len(ex.y)
    n0 = ex.n_draws
    ex.eps_slider.value = 0.1
    ex.steps_slider.value = 2
    ex.picker.value = 4
    assert ex.n_draws - n0 == 3 and (ex.eps, ex.steps, ex.idx) == (0.1, 2, 4)
    assert len(ex.fig.axes) == 4


def _curve_df():
    return pd.DataFrame(dict(eps=[0, 4/255, 8/255]*2, robust_acc=[.9, .6, .3, .85, .7, .55],
                             clean_acc=[.9]*3 + [.85]*3, method=['natural']*3 + ['PGD-AT']*3))


def test_plot_robust_curve():
    df = _curve_df()
    fig = plot_robust_curve(df)
    ax = fig.axes[0]
    assert ax.get_xlabel() == 'eps (pixel units, [0,1] scale)'
    assert [t.get_text() for t in ax.get_xticklabels()] == ['0', '4/255', '8/255']
    labels = [l.get_label() for l in ax.lines]
    assert labels == ['natural', 'natural (clean)', 'PGD-AT', 'PGD-AT (clean)']
    assert list(ax.lines[2].get_ydata()) == [.85, .7, .55]
    # from a dict of {eps: acc} per method, with decimal eps ticks
    fig = plot_robust_curve({'a': {0: .9, 0.05: .5, 0.1: .2}, 'b': {0: .8, 0.05: .6, 0.1: .4}})
    assert [l.get_label() for l in fig.axes[0].lines] == ['a', 'b']
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ['0', '0.05', '0.1']
    # percents and an existing Axes
    f0 = Figure(); ax0 = f0.subplots()
    assert plot_robust_curve(dict(eps=[0, .1], robust_acc=[90, 40]), ax=ax0) is f0
    assert ax0.get_ylim()[1] > 100 and ax0.get_ylabel() == 'robust accuracy (%)'


def test_plot_robust_curve_bad_inputs():
    df = _curve_df()
    with pytest.raises(ValueError, match='robust_acc'): plot_robust_curve(df.drop(columns='robust_acc'))
    with pytest.raises(ValueError, match='eps'): plot_robust_curve(df.drop(columns='eps'))
    with pytest.raises(ValueError, match='`by`'): plot_robust_curve(df, by='nope')
    with pytest.raises(ValueError, match='`data`'): plot_robust_curve([0.1, 0.2])
    with pytest.raises(ValueError, match='`eps_ticks`'): plot_robust_curve(df, eps_ticks='pi')


def test_plot_robust_curve_takes_robust_accuracy_curve(learn):
    from rtl_fastai.callback.adv_valid import robust_accuracy_curve
    df = robust_accuracy_curve(learn, [0, 0.1], steps=2)
    fig = plot_robust_curve(df)
    assert list(fig.axes[0].lines[0].get_ydata()) == list(df.robust_acc)


def _study():
    return pd.DataFrame(dict(source=['robust']*3 + ['natural']*3, n_retrain=[0, 1, 2]*2, eps=8/255,
                             clean_acc=[.7, .8, .85, .8, .87, .9], robust_acc=[.4, .3, .2, .0, .01, .02]))


def test_plot_block_study():
    fig = plot_block_study(_study(), title='t')
    ax = fig.axes[0]
    assert len(ax.lines) == 4
    assert [l.get_label() for l in ax.lines] == ['robust source: clean', 'robust source: PGD (eps 8/255)',
                                                 'natural source: clean', 'natural source: PGD (eps 8/255)']
    assert ax.lines[0].get_color() == ax.lines[1].get_color() != ax.lines[2].get_color()
    assert ax.lines[0].get_linestyle() == '-' and ax.lines[1].get_linestyle() == '--'
    assert 'retrained blocks' in ax.get_xlabel() and ax.get_title() == 't'
    one = plot_block_study(_study().query("source == 'robust'"), by=None, eps=None)
    assert [l.get_label() for l in one.axes[0].lines] == ['clean', 'PGD (eps 8/255)']


def test_plot_block_study_bad_inputs():
    with pytest.raises(ValueError, match='n_retrain'): plot_block_study(_study().drop(columns='n_retrain'))
    with pytest.raises(ValueError, match='robust_acc'): plot_block_study(_study().drop(columns='robust_acc'))
    with pytest.raises(ValueError, match='model'): plot_block_study(_study(), by='model')
    with pytest.raises(ValueError, match='`df`'): plot_block_study([1, 2])
    with pytest.raises(ValueError, match='`eps`'): plot_block_study(_study(), eps=-1)


def test_dl_own_stats():
    "A `dl` given to the pictures is attacked with its own normalization, as `robust_validate` reads it: eps stays eps"
    from rtl_fastai.callback.adv_valid import robust_validate
    set_seed(0)
    l = Learner(task_dls('digits', bs=64, seed=0, device='cpu'), SmallCNN(n_in=1, n_out=10, widths=(8, 16)))
    raw = task_dls('digits', bs=64, seed=0, device='cpu', normalize=False)   # the same images, in pixels
    r = adversarial_examples(l, 4, 0.1, dl=raw.valid, seed=0)
    fed = (r['x_adv'] - r['x']).abs().max().item()   # what the model received: raw pixels
    assert fed <= 0.1 + 1e-6 and r['delta'].abs().max().item() <= 0.1 + 1e-6
    ex = AdversarialExplorer(l, raw.valid, threat=0.1)
    assert ex.stats is raw.valid
    ex.redraw(); plt.close('all')


def test_default_picture_is_reproducible(learn):
    "Seeded by default (seed=0, as AdversarialExplorer): the same picture every call; seed=None draws a new start"
    a, b = (adversarial_examples(learn, n=2, eps=0.2, steps=3) for _ in range(2))
    assert torch.equal(a['x_adv'], b['x_adv'])
    c = adversarial_examples(learn, n=2, eps=0.2, steps=3, seed=None)
    assert c['x_adv'].shape == a['x_adv'].shape


def test_results_tables_plot_as_they_are():
    "The pipeline's and the job's tables (`pgd_acc`) plot without renaming; `n_retrained` (an earlier name) too"
    df = pd.DataFrame(dict(method=['a']*3, eps=[0, 4/255, 8/255], pgd_acc=[0.9, 0.6, 0.3]))
    assert plot_robust_curve(df).axes[0].lines[0].get_ydata().tolist() == [0.9, 0.6, 0.3]
    st = _study().rename(columns={'n_retrain': 'n_retrained', 'robust_acc': 'pgd_acc'})
    assert len(plot_block_study(st).axes[0].lines) == 4
    plt.close('all')


def test_no_dls_and_a_pytorch_loader():
    "`learn` may be anything with `.model`: a PyTorch loader's batches are then taken as pixels (no dls to read stats from)"
    import types
    from torch.utils.data import DataLoader, TensorDataset
    lrn = types.SimpleNamespace(model=SmallCNN(n_in=1, n_out=3, widths=(8,)).eval())
    dl = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))), batch_size=8)
    r = adversarial_examples(lrn, 2, 0.1, dl=dl, steps=2)
    assert (r['x_adv'] - r['x']).abs().max() <= 0.1 + 1e-6
    AdversarialExplorer(lrn, dl, threat=0.1)


def test_unseeded_pictures_differ(learn):
    "seed=None draws PGD's start from the global random state: two calls give two pictures"
    kw = dict(n=4, eps=0.2, steps=1, alpha=0.01)
    assert not torch.equal(adversarial_examples(learn, seed=None, **kw)['x_adv'], adversarial_examples(learn, seed=None, **kw)['x_adv'])


def test_block_study_with_both_columns():
    "A table with n_retrain as text ('all') and n_retrained as numbers plots the numbers; text alone is refused clearly"
    df = pd.DataFrame(dict(source=['r']*3, n_retrain=['0', '1', 'all'], n_retrained=[0, 1, 5],
                           clean_acc=[.5, .6, .7], robust_acc=[.3, .2, .1]))
    assert plot_block_study(df).axes[0].lines[0].get_xdata().tolist() == [0, 1, 5]
    with pytest.raises(ValueError, match="map 'all' to the number of blocks"): plot_block_study(df.drop(columns='n_retrained'))
    plt.close('all')


def test_block_study_numbers_held_as_objects():
    "A column that held 'all' before it was filtered out keeps its numbers as objects: they still plot"
    df = pd.DataFrame(dict(n_retrain=[0, 1, 'all'], clean_acc=[.5, .6, .7], robust_acc=[.3, .2, .1], source=['a']*3))
    assert plot_block_study(df[df.n_retrain != 'all']).axes[0].lines[0].get_xdata().tolist() == [0, 1]
    plt.close('all')
