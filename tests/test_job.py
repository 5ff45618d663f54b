"`transfer_job` / `rtl-fastai transfer` end to end on a small image folder and a local checkpoint in the published layout."
import json, subprocess, sys
from pathlib import Path
import pandas as pd
import pytest
import torch, torchvision
from fastai.learner import load_learner
from rtl_fastai.data.folder import make_image_folder
from rtl_fastai.hub import IMAGENET_STATS
from rtl_fastai.core import input_stats, normalize_stats
from rtl_fastai.job import transfer_job, load_source
from rtl_fastai.cli import main as cli_main


def main(argv): return cli_main(['transfer', *argv])

from test_checkpoint import _madry_ckpt  # the MadryLab layout, built once for both test files

torch.set_num_threads(1)




@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('job')
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=1000).eval()
    torch.save(_madry_ckpt(net), root/'robust_r18.ckpt')
    folder = make_image_folder(root/'shapes', n_per_class=8, n_valid=4, classes=3, size=32)
    return root, folder, net


KW = dict(arch='resnet18', size=32, bs=8, epochs=1, steps=2, seed=0)


def test_end_to_end_and_new_run_folders(files, capsys):
    root, folder, net = files
    out = root/'out'
    res = transfer_job(str(folder), source=str(root/'robust_r18.ckpt'), out=str(out), quiet=True, **KW)
    run1 = out/'run_001'
    assert res['run_dir'] == run1
    assert capsys.readouterr().out == f"{run1}\n"  # quiet: the run folder alone, for scripts
    assert sorted(p.name for p in run1.iterdir()) == ['export.pkl', 'results.csv', 'results.json', 'robust_curve.csv',
                                                      'robust_curve.png']
    js = json.loads((run1/'results.json').read_text())
    r = js['results'][0]
    assert r['n_valid'] == 12 and r['attack'] == 'pgd2_acc@4/255' and 0 <= r['pgd_acc'] <= r['clean_acc'] <= 1
    assert (r['clean_acc'], r['pgd_acc']) == (res['clean_acc'], res['pgd_acc'])
    assert js['settings']['n_retrain'] == '0' and js['sources']['source']['kind'] == 'checkpoint'
    assert js['sources']['data']['classes'] == ['circle', 'square', 'triangle']
    mean, std = normalize_stats(res['learn'].dls)   # the statistics used, and where, are on record
    assert js['sources']['data']['input_stats'] == dict(mean=mean.flatten().tolist(), std=std.flatten().tolist(),
                                                        applied_in='DataLoaders')
    csv = pd.read_csv(run1/'results.csv')
    assert csv.loc[0, 'pgd_acc'] == pytest.approx(res['pgd_acc'])
    crv = pd.read_csv(run1/'robust_curve.csv')
    assert crv['eps'].tolist() == pytest.approx([0, 1/255, 2/255, 4/255, 6/255, 8/255])
    # the curve at eps is the same attack (same seed) as the table's
    assert crv.loc[crv['eps'].sub(4/255).abs().idxmin(), 'robust_acc'] == pytest.approx(res['pgd_acc'])
    assert crv.loc[0, 'robust_acc'] == pytest.approx(res['clean_acc'])  # eps=0: clean accuracy
    # the source's weights were frozen: the trained body is the checkpoint's
    body = {k: v for k, v in res['learn'].model.state_dict().items() if not k.startswith('fc.')}
    assert all(torch.equal(v.cpu(), net.state_dict()[k]) for k, v in body.items())
    # statistics in the DataLoaders, not in the model: normalized once
    assert res['learn'].dls.after_batch.fs.filter(lambda t: type(t).__name__ == 'Normalize')
    # the exported Learner predicts, with the same normalization
    learn = load_learner(run1/'export.pkl')
    pred, idx, probs = learn.predict(folder/'valid'/'square'/'0000.png')
    assert len(probs) == 3 and pred in ('circle', 'square', 'triangle')
    x = res['learn'].dls.valid.one_batch()[0]
    m1, m2 = res['learn'].model.eval(), learn.model.eval()
    assert torch.allclose(m1(x).cpu(), m2.to(x.device)(x).cpu(), atol=1e-5)
    # a second run goes to run_002 and leaves run_001 alone
    before = {p.name: p.read_bytes() for p in run1.iterdir()}
    res2 = transfer_job(str(folder), source=str(root/'robust_r18.ckpt'), out=str(out), quiet=True, curve=False,
                        n_retrain='all', lam=1e-3, **{**KW, 'epochs': 2})
    assert res2['run_dir'] == out/'run_002'
    assert {p.name: p.read_bytes() for p in run1.iterdir()} == before
    assert sorted(p.name for p in res2['run_dir'].iterdir()) == ['export.pkl', 'results.csv', 'results.json']


def test_normalize_inside_model(files):
    "normalize='model': the statistics are a layer of the model and the DataLoaders do not normalize"
    root, folder, net = files
    res = transfer_job(str(folder), source=str(root/'robust_r18.ckpt'), out=str(root/'out_model'), quiet=True,
                       normalize='model', curve=False, **KW)
    dls = res['learn'].dls
    assert not dls.after_batch.fs.filter(lambda t: type(t).__name__ == 'Normalize')
    assert torch.allclose(input_stats(res['learn'].model)[0].flatten().cpu(), torch.tensor(IMAGENET_STATS[0]))
    rec = json.loads((res['run_dir']/'results.json').read_text())['sources']['data']['input_stats']
    assert rec['applied_in'] == 'model' and rec['mean'] == pytest.approx(IMAGENET_STATS[0])
    # the same model as with the statistics in the DataLoaders
    res_dls = transfer_job(str(folder), source=str(root/'robust_r18.ckpt'), out=str(root/'out_model'), quiet=True,
                           curve=False, **KW)
    assert res['clean_acc'] == res_dls['clean_acc'] and res['pgd_acc'] == res_dls['pgd_acc']


def test_load_source_checkpoint_layout(files):
    "The MadryLab file loads bit-exactly, with its statistics; a natural torchvision source needs no file"
    root, _, net = files
    m, desc = load_source(str(root/'robust_r18.ckpt'), arch='resnet18')
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in m.state_dict().items())
    assert torch.allclose(input_stats(m)[1].flatten(), torch.tensor(IMAGENET_STATS[1]))
    m, desc = load_source('torchvision:resnet18', pretrained=False)
    assert desc['kind'] == 'natural' and input_stats(m) is not None


def test_stats_that_contradict_the_source_are_refused(files, tmp_path):
    "A checkpoint that stores its statistics (or a registry model) with other `stats`, or 'none': an error, not ignored"
    root, _, net = files
    for st in ('0.5,0.5,0.5/0.5,0.5,0.5', 'none'):
        with pytest.raises(ValueError, match=r"`stats`: the checkpoint robust_r18\.ckpt stores the input statistics"):
            load_source(str(root/'robust_r18.ckpt'), arch='resnet18', stats=st)
    m, _ = load_source(str(root/'robust_r18.ckpt'), arch='resnet18', stats='imagenet')   # the same: accepted
    for st in ('0.5,0.5,0.5/0.5,0.5,0.5', 'none'):
        with pytest.raises(ValueError, match=r"`stats` differ from the statistics 'resnet18_linf_eps4\.0'"):
            load_source('resnet18_linf_eps4.0', stats=st)


def test_registry_file_fetched_by_hand_under_its_own_name(files, tmp_path):
    "A registry model's file saved under its published name (`Salman2020Do_R18.pt`) needs no `arch`"
    root, _, net = files
    (tmp_path/'Salman2020Do_R18.pt').write_bytes((root/'robust_r18.ckpt').read_bytes())
    m, desc = load_source(str(tmp_path/'Salman2020Do_R18.pt'))
    assert desc['arch'] == 'resnet18' and desc['threat'] != 'unknown'
    assert desc['norm'] == 'linf' and abs(desc['eps'] - 4/255) < 1e-12
    (tmp_path/'mine.pt').write_bytes((root/'robust_r18.ckpt').read_bytes())
    m, desc = load_source(str(tmp_path/'mine.pt'), arch='resnet18')   # a file of unknown training
    assert desc['threat'] == 'unknown' and desc['norm'] is None and desc['eps'] is None
    with pytest.raises(ValueError, match=r"`arch`='resnet50' contradicts the checkpoint Salman2020Do_R18\.pt"):
        load_source(str(tmp_path/'Salman2020Do_R18.pt'), arch='resnet50')


def test_layouts_no_arch_fits_are_explained(tmp_path):
    "A fastai `vision_learner` save and a CIFAR ResNet (MadryLab's CIFAR-10 models): the mismatch says what they are"
    from fastai.vision.learner import vision_learner
    from fastai.data.core import DataLoaders
    from torch.utils.data import TensorDataset
    ds = TensorDataset(torch.rand(4, 3, 32, 32), torch.arange(4) % 2)
    learn = vision_learner(DataLoaders.from_dsets(ds, ds, bs=2), torchvision.models.resnet18, pretrained=False, n_out=2,
                           loss_func=torch.nn.CrossEntropyLoss())
    torch.save(learn.model.state_dict(), tmp_path/'fastai.pth')
    with pytest.raises(Exception, match=r"(?s)keys start with `0\.` and `1\.`: a fastai `vision_learner`"):
        load_source(str(tmp_path/'fastai.pth'), arch='resnet18', stats='imagenet')
    sd = {'conv1.weight': torch.zeros(64, 3, 3, 3), 'layer1.0.shortcut.0.weight': torch.zeros(256, 64, 1, 1),
          'linear.weight': torch.zeros(10, 2048), 'linear.bias': torch.zeros(10)}
    torch.save(sd, tmp_path/'cifar.pt')
    with pytest.raises(Exception, match=r"(?s)looks like a CIFAR ResNet"):
        load_source(str(tmp_path/'cifar.pt'), arch='resnet50', stats='none')


def test_quiet_prints_the_run_folder_alone_on_a_large_folder(files, tmp_path, capsys):
    "More images than the folder check's bar threshold (300): `quiet` still prints the run folder alone"
    root, _, _ = files
    folder = make_image_folder(tmp_path/'big', n_per_class=100, n_valid=2, classes=3, size=8)
    res = transfer_job(str(folder), source=str(root/'robust_r18.ckpt'), out=str(tmp_path/'out'), quiet=True,
                       curve=False, **{**KW, 'steps': 1})
    assert capsys.readouterr().out == f"{res['run_dir']}\n"


def test_n_batches_samples_the_classes(files, tmp_path, recwarn):
    "`n_batches` attacks a fixed random sample of the validation images (in class order, the first batch is one class)"
    root, folder, _ = files
    res = transfer_job(str(folder), source=str(root/'robust_r18.ckpt'), out=str(tmp_path/'out'), quiet=True,
                       **{**KW, 'bs': 4}, n_batches=1)
    assert res['n'] == 4 and len(res['curve']) and (res['curve'].n == 4).all()
    assert not [w for w in recwarn if 'classes' in str(w.message)]


def test_warns_when_evaluating_another_threat_model_than_the_sources(files, tmp_path, capsys):
    "An L2 source evaluated with L-inf attacks: a warning naming the source's threat model"
    root, folder, _ = files
    (tmp_path/'resnet18_l2_eps3.ckpt').write_bytes((root/'robust_r18.ckpt').read_bytes())
    with pytest.warns(UserWarning, match=r"trained against l2 attacks of radius 3.*norm='l2', eps=3") as rec:
        transfer_job(str(folder), source=str(tmp_path/'resnet18_l2_eps3.ckpt'), out=str(tmp_path/'out'), quiet=True,
                     curve=False, **{k: v for k, v in KW.items() if k != 'arch'})
    w = next(r for r in rec if 'trained against' in str(r.message))
    assert w.filename == __file__   # the caller's line, where the job was started
    main([str(folder), '--source', str(tmp_path/'resnet18_l2_eps3.ckpt'), '--out', str(tmp_path/'out'), '--quiet',
          '--no-curve', *[a for k, v in KW.items() if k != 'arch' for a in (f"--{k.replace('_', '-')}", str(v))]])
    err = capsys.readouterr().err   # the command line prints it in its own words, without a Python location
    assert "rtl-fastai transfer: warning: the source was trained against l2 attacks" in err and '--norm l2, --eps 3' in err


def test_run_on_an_image_folder_points_to_transfer(files):
    "`rtl-fastai run --data FOLDER` with the user's own folder says that `rtl-fastai transfer` is for that"
    _, folder, _ = files
    with pytest.raises(SystemExit) as e: cli_main(['run', '--data', str(folder), '--check-only'])
    assert 'neither MNIST nor CIFAR-10' in str(e.value) and '`rtl-fastai transfer FOLDER' in str(e.value)


def test_valid_pct_on_a_folder_of_class_folders(files, tmp_path, capsys):
    "`rtl-fastai transfer DATA --valid-pct 0.25` on class folders without a split; without it, the error names the option"
    root, folder, _ = files
    with pytest.raises(SystemExit) as e: main([str(folder/'train'), '--source', str(root/'robust_r18.ckpt'), '--arch', 'resnet18'])
    assert '`--valid-pct 0.2`' in str(e.value)
    main([str(folder/'train'), '--source', str(root/'robust_r18.ckpt'), '--arch', 'resnet18', '--size', '32', '--bs', '4',
          '--epochs', '1', '--steps', '1', '--no-curve', '--valid-pct', '0.25', '--out', str(tmp_path/'out'), '--quiet'])
    js = json.loads((Path(capsys.readouterr().out.strip().splitlines()[-1])/'results.json').read_text())
    assert js['sources']['data']['n_valid'] == 6 and js['settings']['valid_pct'] == 0.25


def test_checkpoint_of_other_classes_and_plain_state_dict(tmp_path):
    "A plain state dict (no statistics stored) of a 10-class ResNet-18: the head size is read from the file, stats said"
    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=10)
    torch.save(net.state_dict(), tmp_path/'cifar_r18.pth')
    with pytest.raises(ValueError, match=r"`stats`: the checkpoint cifar_r18\.pth stores no input statistics"):
        load_source(str(tmp_path/'cifar_r18.pth'), arch='resnet18')
    m, _ = load_source(str(tmp_path/'cifar_r18.pth'), arch='resnet18', stats='0.5,0.5,0.5/0.25,0.25,0.25')
    assert m.fc.out_features == 10 and all(torch.equal(v, net.state_dict()[k]) for k, v in m.state_dict().items())
    assert torch.allclose(input_stats(m)[1].flatten(), torch.full((3,), 0.25))
    m, _ = load_source(str(tmp_path/'cifar_r18.pth'), arch='resnet18', stats='none')
    assert [t.flatten().tolist() for t in input_stats(m)] == [[0.]*3, [1.]*3]   # [0,1] pixels: the identity


def test_stats_none_wins_over_timm_defaults(tmp_path):
    "`stats='none'` ([0,1] pixels) also for a timm architecture, whose `pretrained_cfg` says ImageNet: no `Normalize`"
    timm = pytest.importorskip('timm')
    torch.save(timm.create_model('resnet18', pretrained=False, num_classes=2).state_dict(), tmp_path/'t.pth')
    folder = make_image_folder(tmp_path/'f', n_per_class=4, n_valid=2, classes=2, size=32)
    kw = dict(stats='none', size=32, bs=4, epochs=1, steps=1, curve=False, out=str(tmp_path/'out'), quiet=True)
    for source, more in ((str(tmp_path/'t.pth'), dict(arch='timm:resnet18')), ('timm:resnet18', dict(pretrained=False))):
        res = transfer_job(str(folder), source=source, **more, **kw)
        assert normalize_stats(res['learn'].dls) is None, source
        assert json.loads((res['run_dir']/'results.json').read_text())['sources']['data']['input_stats'] is None


def test_natural_timm_source(tmp_path):
    pytest.importorskip('timm')
    m, desc = load_source('timm:resnet18', pretrained=False)
    assert desc['kind'] == 'natural' and torch.allclose(input_stats(m)[0].flatten(), torch.tensor(IMAGENET_STATS[0]))
    folder = make_image_folder(tmp_path/'f', n_per_class=4, n_valid=2, classes=2, size=32)
    res = transfer_job(str(folder), source='timm:resnet18', pretrained=False, size=32, bs=4, epochs=1, steps=1,
                       n_retrain='1', curve=False, out=str(tmp_path/'out'), quiet=True)
    assert res['n'] == 4 and (res['run_dir']/'export.pkl').is_file()


def test_registry_name_with_mocked_download(files, tmp_path, monkeypatch):
    "A registry name downloads the published file once (here: a mocked downloader copying the local stand-in)"
    import rtl_fastai.checkpoint as ck
    root, folder, net = files
    urls = []
    def fake(url, dest): urls.append(url); Path(dest).write_bytes((root/'robust_r18.ckpt').read_bytes())
    monkeypatch.setattr(ck, '_download', fake)
    monkeypatch.setenv('RTL_CACHE', str(tmp_path/'cache'))
    m, desc = load_source('resnet18_linf_eps4.0')
    assert urls == ['https://huggingface.co/madrylab/robust-imagenet-models/resolve/main/resnet18_linf_eps4.0.ckpt']
    assert desc['kind'] == 'registry' and desc['threat'] == 'Linf eps=4/255'
    assert desc['norm'] == 'linf' and abs(desc['eps'] - 4/255) < 1e-12
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in m.state_dict().items())


def test_command_line(files, capsys):
    root, folder, _ = files
    with pytest.raises(SystemExit) as e: main(['--help'])
    assert e.value.code == 0
    h = capsys.readouterr().out
    for opt in ('--source', '--arch', '--size', '--n_retrain', '--lam', '--eps', '--steps', '--epochs', '--out', 'data'):
        assert opt in h, opt
    assert 'registry name' in h  # the docments are the help
    out = root/'cli_out'
    assert main([str(folder), '--source', str(root/'robust_r18.ckpt'), '--arch', 'resnet18', '--size', '32', '--bs', '8',
                 '--epochs', '1', '--steps', '2', '--n_retrain', '1', '--eps', '2/255', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'pgd2_acc@2/255' in printed and 'run_001' in printed
    assert (out/'run_001'/'export.pkl').is_file()
    with pytest.raises(SystemExit) as e: main([str(folder), '--eps', '8', '--out', str(out)])
    assert "`--eps 8` is larger than the whole [0,1] pixel range" in str(e.value.code)
    assert sorted(p.name for p in out.iterdir()) == ['run_001']
    capsys.readouterr()
    assert main([str(folder), '--source', str(root/'robust_r18.ckpt'), '--arch', 'resnet18', '--size', '32', '--bs', '8',
                 '--out', str(out), '--check-only']) == 0   # every check, then nothing trained or written
    assert 'every check passed; nothing was trained or written' in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ['run_001']
    with pytest.raises(SystemExit) as e:
        main([str(folder), '--source', str(root/'robust_r18.ckpt'), '--size', '32', '--check-only'])
    assert '`--arch` is missing' in str(e.value.code)


def test_python_m_help():
    r = subprocess.run([sys.executable, '-m', 'rtl_fastai.cli', 'transfer', '--help'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'usage: rtl-fastai transfer' in r.stdout and '--n_retrain' in r.stdout


def test_pretrained_source_keeps_its_statistics(monkeypatch):
    "The published weights of a torchvision/timm source expect their statistics: other `stats` are refused."
    import torchvision
    import rtl_fastai.job as J
    from rtl_fastai.core import normalize_stats
    fake = lambda *a, **k: (torchvision.models.resnet18(), normalize_stats(J.IMAGENET_STATS))  # no download here
    monkeypatch.setattr(J, 'build_arch', fake)
    with pytest.raises(ValueError, match='leave `stats` out'): load_source('torchvision:resnet18', stats='none')
    with pytest.raises(ValueError, match='leave `stats` out'): load_source('timm:resnet18', stats='0.5,0.5,0.5/0.5,0.5,0.5')
    load_source('torchvision:resnet18', stats='imagenet')                  # the same statistics: fine
    load_source('torchvision:resnet18', stats='none', pretrained=False)   # random weights: any


def test_random_source_weights_follow_the_seed(files, tmp_path):
    "`pretrained=False`: the source's random weights come from `seed`, so two runs of the same job give the same model"
    _, folder, _ = files
    kw = dict(source='torchvision:resnet18', pretrained=False, size=32, bs=8, epochs=1, steps=1, curve=False, seed=0,
              quiet=True)
    a, b = (transfer_job(str(folder), out=str(tmp_path/f'o{k}'), **kw) for k in range(2))
    assert a['learn'].recorder.values == b['learn'].recorder.values
    assert all(torch.equal(p, q) for p, q in zip(a['learn'].model.state_dict().values(), b['learn'].model.state_dict().values()))


def test_upsampling_is_said_in_the_jobs_words(files, tmp_path):
    "A job that upsamples its images (32 px to 64): one warning, naming the job and what it can do, none from folder_dls"
    import warnings
    root, folder, _ = files
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        transfer_job(str(folder), source=str(root/'robust_r18.ckpt'), out=str(tmp_path/'out'), quiet=True, curve=False,
                     **{**KW, 'size': 64})
    up = [str(o.message) for o in w if 'upsamples them' in str(o.message)]
    assert len(up) == 1 and up[0].startswith('transfer_job: the images are about 32x32') and 'in Python' in up[0]
