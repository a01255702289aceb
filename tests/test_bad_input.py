"""Bad data stops with one sentence naming the file or flag and what to do (docs/flags.md)."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest

from dataloader.datasets import DEFAULT_FEATURES
from dataloader.datasets import DataError
from dataloader.gcnet import feature_names_from, load_dataset


@pytest.fixture
def mosi(tmp_path, tiny_root):
    """A private copy of the tiny CMU-MOSI set that a test may damage."""
    shutil.copytree(tiny_root / "CMUMOSI", tmp_path / "CMUMOSI",
                    ignore=shutil.ignore_patterns(".cache"))
    return tmp_path


def _one_sentence(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message.endswith(".")
    return message


def _a_text_file(root):
    return sorted((root / "CMUMOSI" / "features" / DEFAULT_FEATURES["t"]).glob("*.npy"))[3]


def test_missing_feature_folder_names_the_flag(mosi):
    with pytest.raises(DataError) as error:
        load_dataset("CMUMOSI", mosi, feature_names_from(text="roberta-UTT"))
    assert "roberta-UTT" in _one_sentence(error) and "--text-feature" in str(error.value)


def test_missing_feature_file_names_the_utterance(mosi):
    victim = _a_text_file(mosi)
    victim.unlink()
    with pytest.raises(DataError) as error:
        load_dataset("CMUMOSI", mosi, use_cache=False)
    assert victim.stem in _one_sentence(error)


def test_unreadable_label_file(mosi):
    (mosi / "CMUMOSI" / "CMUMOSI_features_raw_2way.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError) as error:
        load_dataset("CMUMOSI", mosi)
    assert "CMUMOSI_features_raw_2way.pkl: cannot be read" in _one_sentence(error)


def test_wrongly_shaped_label_file(mosi):
    path = mosi / "CMUMOSI" / "CMUMOSI_features_raw_2way.pkl"
    path.write_bytes(pickle.dumps(({}, {}, {})))
    with pytest.raises(DataError) as error:
        load_dataset("CMUMOSI", mosi)
    assert "expected a 7-tuple" in _one_sentence(error)


def test_label_count_differs_from_utterance_count(mosi):
    path = mosi / "CMUMOSI" / "CMUMOSI_features_raw_2way.pkl"
    content = pickle.loads(path.read_bytes())
    vid = sorted(content[1])[0]
    content[1][vid] = content[1][vid][:-1]
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(DataError) as error:
        load_dataset("CMUMOSI", mosi)
    assert vid in _one_sentence(error)


def test_feature_dimension_differs_between_files(mosi):
    victim = _a_text_file(mosi)
    np.save(victim, np.zeros(7, dtype=np.float32))
    with pytest.raises(DataError) as error:
        load_dataset("CMUMOSI", mosi, use_cache=False)
    assert victim.name in _one_sentence(error) and "dimension 7" in str(error.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values(mosi, bad):
    victim = _a_text_file(mosi)
    values = np.load(victim)
    values.flat[0] = bad
    np.save(victim, values)
    with pytest.raises(DataError) as error:
        load_dataset("CMUMOSI", mosi, use_cache=False)
    assert victim.name in _one_sentence(error) and "NaN or infinite" in str(error.value)


def test_unknown_dataset_name(mosi):
    with pytest.raises(ValueError) as error:
        load_dataset("CMUMOSE", mosi)
    assert "--dataset 'CMUMOSE' is unknown" in _one_sentence(error)


def test_missing_label_file_says_how_to_generate(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("IEMOCAPFour", tmp_path)
    assert "python -m dataloader.synthetic --dataset IEMOCAPFour" in _one_sentence(error)
