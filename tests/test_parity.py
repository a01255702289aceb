"""The parity harness end to end, on a tiny fake of the official repository made here (its command
line and log format, a few lines), so no official code is needed; and its refusals."""
from __future__ import annotations

import csv
import shutil
import textwrap
from pathlib import Path

import pytest

from MoMKE.experiments import official, parity

FAKE_TRAIN = '''
import argparse, os, sys
sys.path.append('./')
import config

parser = argparse.ArgumentParser()
for flag in ('--audio-feature', '--text-feature', '--video-feature', '--dataset', '--depth',
             '--num_heads', '--drop_rate', '--attn_drop_rate', '--hidden', '--lr', '--l2',
             '--batch-size', '--epochs', '--seed', '--test_condition', '--stage_epoch', '--gpu'):
    parser.add_argument(flag)
parser.add_argument('--no-cuda', action='store_true')
args = parser.parse_args()
features = config.PATH_TO_FEATURES[args.dataset]
assert os.path.isfile(config.PATH_TO_LABEL[args.dataset])
for name in (args.audio_feature, args.text_feature, args.video_feature):
    assert os.path.isdir(os.path.join(features, name)), name
os.makedirs(config.LOG_DIR, exist_ok=True)
epochs, stage, seed, c = int(args.epochs), int(float(args.stage_epoch)), int(args.seed), args.test_condition
print('====== Training and Testing =======')
for fold in range(5 if args.dataset.startswith('IEMOCAP') else 1):
    print(f'>>>>> Cross-validation: training on the {fold + 1} folder >>>>>')
    accs = []
    for epoch in range(epochs):
        if epoch < stage:
            accs.append(0.5)  # stage-1 test passes are scored but not printed
            print(f'epoch:{epoch}; a_acc_train:0.600; t_acc_train:0.700; v_acc_train:0.500')
            print(f'epoch:{epoch}; a_acc_test:0.600; t_acc_test:0.700; v_acc_test:0.500')
        else:
            acc = 0.70 + 0.01 * seed + 0.001 * epoch + 0.02 * len(c)
            accs.append(acc)
            print(f'epoch:{epoch}; train_mae_{c}:0.900; train_corr_{c}:0.500; train_fscore_{c}:{acc:2.2%}; train_acc_{c}:{acc:2.2%}; train_loss_{c}:0.5')
            print(f'epoch:{epoch}; test_mae_{c}:0.800; test_corr_{c}:0.600; test_fscore_{c}:{acc:2.2%}; test_acc_{c}:{acc:2.2%}; test_loss_{c}:0.4')
        print('-' * 10)
        if epoch == stage - 1:
            for m in 'atv':
                print(f'best_epoch_{m}: {stage - 1}')
    best = max(range(epochs), key=accs.__getitem__)
    print(f'The best(acc) epoch of test_condition ({c}): {best} --test_mae 0.8 --test_corr 0.6 --test_fscores {accs[best]} --test_acc {accs[best]}.')
    print(f'>>>>> Finish: training on the {fold + 1} folder, duration: 1.0 >>>>>')
'''
FAKE_CONFIG = '''
import os
PATH_TO_FEATURES = {'CMUMOSI': '/nowhere'}
PATH_TO_LABEL = {'CMUMOSI': '/nowhere'}
SAVED_ROOT = '/nowhere'
LOG_DIR = os.path.join(SAVED_ROOT, 'log')
MODEL_DIR = os.path.join(SAVED_ROOT, 'model')
'''


def _fake_official(root: Path, extra_import: str = "") -> Path:
    (root / "MoMKE").mkdir(parents=True)
    (root / "MoMKE" / "train_MoMKE.py").write_text(extra_import + textwrap.dedent(FAKE_TRAIN))
    (root / "MoMKE" / "model_expert_softmoe.py").write_text("# the model would be here\n")
    (root / "config.py").write_text(textwrap.dedent(FAKE_CONFIG))
    return root


def _argv(code: Path, data: Path, out: Path) -> list[str]:
    return ["--official-code", str(code), "--dataset", "CMUMOSI", "--data-root", str(data),
            "--test-condition", "v,atv", "--seeds", "3,4", "--out", str(out), "--epochs", "4",
            "--stage-epochs", "2", "--batch-size", "4", "--hidden", "8", "--depth", "1",
            "--threads", "1"]


@pytest.mark.slow
def test_the_harness_runs_both_codes_and_writes_the_table(tiny_root, tmp_path, capsys):
    code = _fake_official(tmp_path / "official")
    out = tmp_path / "parity"
    assert parity.main(_argv(code, tiny_root, out)) == 0
    text = (out / "parity.md").read_text()
    assert "SYNTHETIC DATA" in text and "Welch" in text and "commit `unknown`" in text
    # The fake reports, for atv, its last epoch (index 3): 0.70 + 0.01 seed + 0.003 + 0.06
    # -> 79.3 % (seed 3) and 80.3 % (seed 4): mean 79.80 ± 0.71
    line = next(row for row in text.splitlines() if row.startswith("| atv | Acc2 |"))
    assert "| 79.80 ± 0.71 |" in line
    assert line.rstrip(" |").split()[-1] in ("equivalent", "undecided", "different")
    rows = list(csv.DictReader((out / "parity.csv").open()))
    assert {r["rule"] for r in rows} == {"best_test", "last"}
    cell = next(r for r in rows if r["condition"] == "v" and r["metric"] == "acc2"
                and r["rule"] == "best_test")
    assert (cell["n_official"], cell["n_ours"], cell["official_mean"]) == ("2", "2", "75.8000")
    assert "## Which epoch is reported: condition v" in text
    assert "| 3 | 1 | 4 (2) | 75.30 |" in text  # official: epoch 4 of stage 2, its F1
    assert len(list(out.glob("official/*.log"))) == 4
    # Run again: the official runs are kept, ours are complete; the same tables.
    assert parity.main(_argv(code, tiny_root, out)) == 0
    assert "kept from" in capsys.readouterr().out
    costs = "## What each code cost"  # this harness's own wall time differs, nothing else
    assert (out / "parity.md").read_text().split(costs)[0] == text.split(costs)[0]


def test_a_folder_that_is_not_a_momke_checkout_is_refused(tiny_root, tmp_path, capsys):
    (tmp_path / "elsewhere").mkdir()
    assert parity.main(_argv(tmp_path / "elsewhere", tiny_root, tmp_path / "out")) == 2
    assert "not a checkout of the official MoMKE code" in capsys.readouterr().err


def test_a_dependency_the_official_code_imports_is_named(tiny_root, tmp_path, capsys):
    code = _fake_official(tmp_path / "official", "import pandas_momke_absent\n")
    assert parity.main(_argv(code, tiny_root, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "the official code imports pandas_momke_absent" in err and "pip install" in err
    assert official.imported_modules(code) == {"pandas_momke_absent"}  # config, os: not third-party


def test_data_without_a_feature_the_official_code_reads_is_refused(tiny_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_root / "CMUMOSI", data / "CMUMOSI")
    shutil.rmtree(data / "CMUMOSI" / "features" / "manet_UTT")
    code = _fake_official(tmp_path / "official")
    assert parity.main(_argv(code, data, tmp_path / "out")) == 2
    assert "manet_UTT: the official code reads it for CMUMOSI" in capsys.readouterr().err


def test_the_official_log_is_read_as_printed():
    lines = ["Step2: training", ">>>>> Cross-validation: training on the 1 folder >>>>>",
             "epoch:0; a_acc_train:0.610; t_acc_train:0.700; v_acc_train:0.500",
             "best_epoch_t: 0",
             "epoch:1; test_mae_atv:0.812; test_corr_atv:nan; test_fscore_atv:81.50%; "
             "test_acc_atv:81.55%; test_loss_atv:0.0",
             "The best(acc) epoch of test_condition (atv): 1 --test_mae 0.81 --test_corr nan "
             "--test_fscores 0.815 --test_acc 0.8155."]
    (fold,) = official.parse_log([(float(i), line) for i, line in enumerate(lines)],
                                 regression=True)
    assert fold.epoch_seconds == [(1, 1, 1.0), (2, 2, 2.0)]
    assert fold.handover == {"t": 1} and fold.reported_epoch == 2
    assert fold.test[2]["acc2"] == pytest.approx(0.8155) and fold.reported["f1"] == 0.815
    assert str(fold.test[2]["corr_nonzero"]) == "nan"
