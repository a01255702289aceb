"""The loader reads synthetic features built on every real utterance id back exactly."""
from __future__ import annotations

import numpy as np
import pytest

from dataloader.datasets import get_spec
from dataloader.gcnet import load_dataset
from dataloader.labels import read_label_file
from dataloader.synthetic import generate
from tests.conftest import requires_shared_labels

CASES = [
    # dataset, conversations, utterances, per-fold (train, val, test) conversation counts
    ("CMUMOSI", 93, 2199, [(52, 10, 31)]),
    ("IEMOCAPFour", 151, 5531, [(123, 0, 28), (121, 0, 30), (119, 0, 32), (121, 0, 30),
                                (120, 0, 31)]),
    ("IEMOCAPSix", 151, 7433, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("dataset, conversations, utterances, folds", CASES)
def test_real_ids_read_back_exactly(tmp_path, dataset, conversations, utterances, folds):
    spec = get_spec(dataset)
    label_file = requires_shared_labels(spec.label_file)
    generate(dataset, tmp_path, seed=0, dims=(4, 4, 4), labels=label_file)
    data = load_dataset(dataset, tmp_path, use_cache=False)
    real = read_label_file(label_file, spec)

    assert data.data_source == "synthetic"
    assert len(data.conversation_ids) == conversations
    assert data.num_utterances == utterances
    assert data.conversation_ids == real.conversation_ids
    assert list(data.utterance_ids) == [u for ids in real.utterance_ids for u in ids]
    np.testing.assert_array_equal(data.labels, np.concatenate(real.labels))
    assert [len(f.test) for f in data.folds] and len(data.folds) == spec.num_folds
    if folds is not None:
        assert [(len(f.train), len(f.val), len(f.test)) for f in data.folds] == folds
    for fold in data.folds:
        assert not set(fold.train) & set(fold.test) and not set(fold.val) & set(fold.test)
    if spec.num_folds > 1:  # every dialogue is tested exactly once across the session folds
        assert sorted(i for f in data.folds for i in f.test) == list(range(conversations))
    else:
        fold = data.folds[0]
        assert sorted(fold.train + fold.val + fold.test) == list(range(conversations))
    assert data.dims == {"a": 4, "t": 4, "v": 4}
    assert all(np.isfinite(x).all() for x in data.features.values())


def test_iemocap_sessions_are_the_folds():
    spec = get_spec("IEMOCAPFour")
    labels = read_label_file(requires_shared_labels(spec.label_file), spec)
    for k, fold in enumerate(labels.folds, start=1):
        assert {labels.conversation_ids[i][4] for i in fold.test} == {str(k)}
        assert str(k) not in {labels.conversation_ids[i][4] for i in fold.train}
