"""The synthetic default: GCNet layout, deterministic, and built so the paper's claims can show."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from sklearn.linear_model import Ridge, RidgeClassifier
from sklearn.metrics import accuracy_score, f1_score

from dataloader.gcnet import load_dataset
from dataloader.synthetic import generate, main


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and ".cache" not in path.parts:
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_command_line_writes_the_layout_deterministically(tmp_path):
    for out in ("one", "two"):
        assert main(["--dataset", "CMUMOSI", "--scale", "0.05", "--dims", "4,6,8", "--seed", "3",
                     "--out", str(tmp_path / out)]) == 0
    main(["--dataset", "CMUMOSI", "--scale", "0.05", "--dims", "4,6,8", "--seed", "4",
          "--out", str(tmp_path / "other")])
    root = tmp_path / "one" / "CMUMOSI"
    assert (root / "CMUMOSI_features_raw_2way.pkl").is_file()
    assert json.loads((root / "SYNTHETIC.json").read_text())["seed"] == 3
    assert {p.name for p in (root / "features").iterdir()} == {
        "wav2vec-large-c-UTT", "deberta-large-4-UTT", "manet_UTT"}
    assert _digest(root) == _digest(tmp_path / "two" / "CMUMOSI")
    assert _digest(root) != _digest(tmp_path / "other" / "CMUMOSI")
    data = load_dataset("CMUMOSI", tmp_path / "one")
    assert data.dims == {"a": 4, "t": 6, "v": 8} and data.data_source == "synthetic"


def test_iemocap_folder_holds_both_label_sets(tiny_root):
    four = load_dataset("IEMOCAPFour", tiny_root)
    six = load_dataset("IEMOCAPSix", tiny_root)
    assert set(four.utterance_ids) < set(six.utterance_ids)
    assert four.conversation_ids == six.conversation_ids
    assert len(four.folds) == 5 and all(len(f.test) >= 2 for f in four.folds)
    assert set(np.unique(four.labels)) == {0, 1, 2, 3}


def test_full_size_counts_match_the_real_datasets(tmp_path):
    generate("IEMOCAPSix", tmp_path, dims=(2, 2, 2))
    generate("CMUMOSI", tmp_path, dims=(2, 2, 2))
    expected = {"CMUMOSI": (93, 2199, 63), "IEMOCAPFour": (151, 5531, None),
                "IEMOCAPSix": (151, 7433, 110)}
    for name, (conversations, utterances, longest) in expected.items():
        data = load_dataset(name, tmp_path, use_cache=False)
        assert (len(data.conversation_ids), data.num_utterances) == (conversations, utterances)
        assert longest is None or data.lengths().max() == longest


# ----------------------------------------------------------------------------- linear probes

def _rows(data, conversations):
    return np.concatenate([np.arange(data.offsets[c], data.offsets[c + 1]) for c in conversations])


def _context(data, x):
    """Mean of the other utterances of each utterance's conversation."""
    out = np.zeros_like(x)
    for c in range(len(data.conversation_ids)):
        s, e = data.offsets[c], data.offsets[c + 1]
        out[s:e] = (x[s:e].sum(0) - x[s:e]) / max(e - s - 1, 1)
    return out


def _probe(data, x, train, test):
    y = data.labels
    if data.spec.is_regression:  # weighted F1 of the sign on non-zero labels, as the paper
        predicted = Ridge(alpha=100.0).fit(x[train], y[train]).predict(x[test])
        keep = y[test] != 0
        return f1_score(y[test][keep] > 0, predicted[keep] > 0, average="weighted")
    model = RidgeClassifier(alpha=3000.0).fit(x[train], y[train])
    return accuracy_score(y[test], model.predict(x[test]))


def _chance(data, test):
    y = data.labels[test]
    if data.spec.is_regression:
        sign = y[y != 0] > 0
        majority = np.full_like(sign, sign.mean() >= 0.5)
        return f1_score(sign, majority, average="weighted")
    return np.bincount(y).max() / len(y)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["CMUMOSI", "IEMOCAPFour"])
def test_linear_probes_show_the_papers_structure(tmp_path, dataset):
    generate(dataset, tmp_path, seed=0)
    data = load_dataset(dataset, tmp_path, use_cache=False)
    fold = data.folds[0]
    train, test = _rows(data, fold.train), _rows(data, fold.val + fold.test)
    x = data.features
    score = {m: _probe(data, x[m], train, test) for m in "atv"}
    score["atv"] = _probe(data, np.concatenate([x[m] for m in "atv"], axis=1), train, test)
    score["t+context"] = _probe(data, np.concatenate([x["t"], _context(data, x["t"])], axis=1),
                                train, test)
    chance = _chance(data, test)
    print(dataset, {k: round(v, 3) for k, v in score.items()}, "chance", round(chance, 3))
    assert score["t"] > score["a"] + 0.03 > score["v"] + 0.06 > chance + 0.09
    assert score["atv"] > score["t"] + 0.01
    assert score["t+context"] > score["t"] + 0.01
