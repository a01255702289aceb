"""GCNet per-file shapes, face folders, prefix lookup and speaker faces (docs/data.md)."""
from __future__ import annotations

import numpy as np
import pytest

from dataloader.datasets import DataError
from dataloader.features import read_feature_folder


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(array, dtype=np.float32))


def test_file_shapes_dim_one_dim_and_frames(tmp_path):
    _save(tmp_path / "u1.npy", [1, 2, 3])
    _save(tmp_path / "u2.npy", [[4, 5, 6]])
    _save(tmp_path / "u3.npy", [[0, 0, 0], [2, 4, 6]])  # mean over T
    got = read_feature_folder(tmp_path, ["u1", "u2", "u3"], None)
    np.testing.assert_allclose(got.values, [[1, 2, 3], [4, 5, 6], [1, 2, 3]])
    assert got.values.dtype == np.float32 and got.empty_faces == 0


def test_face_folder_is_averaged(tmp_path):
    _save(tmp_path / "u1" / "face_0.npy", [2, 0])
    _save(tmp_path / "u1" / "face_1.npy", [[0, 2]])
    _save(tmp_path / "u3.npy", [5, 5])
    got = read_feature_folder(tmp_path, ["u1", "u3"], None, faces=True)
    np.testing.assert_allclose(got.values, [[1, 1], [5, 5]])
    assert got.empty_faces == 0


def test_cmu_folder_without_faces_is_refused_not_zero(tmp_path):
    # A folder where a CMU file should be is a broken download, not a missing face.
    (tmp_path / "u2").mkdir()
    _save(tmp_path / "u3.npy", [5, 5])
    with pytest.raises(DataError, match=r"u2: a face folder with no \.npy face vector"):
        read_feature_folder(tmp_path, ["u2", "u3"], None, faces=True)


def test_folder_in_audio_or_text_features_is_refused(tmp_path):
    _save(tmp_path / "u1" / "frame_0.npy", [1, 2])
    with pytest.raises(DataError, match="u1: is a folder, but .* entries must be .npy files"):
        read_feature_folder(tmp_path, ["u1"], None)


def test_values_that_overflow_float32_training_are_refused(tmp_path):
    _save(tmp_path / "u1.npy", [1.0, 1e30])
    with pytest.raises(DataError, match=r"u1.npy: holds values up to 1e\+30 in magnitude"):
        read_feature_folder(tmp_path, ["u1"], None)


def test_iemocap_prefix_lookup_and_speaker_faces(tmp_path):
    # Face names of the utterance's own speaker count; the id's own 'F' in Ses01F is ignored.
    _save(tmp_path / "Ses01F_impro01_M000" / "Ses01F_impro01_M000_F_00.npy", [9, 9])
    _save(tmp_path / "Ses01F_impro01_M000" / "Ses01F_impro01_M000_M_00.npy", [1, 3])
    _save(tmp_path / "Ses01F_impro01_M000" / "Ses01F_impro01_M000_M_01.npy", [3, 1])
    _save(tmp_path / "Ses01F_impro01_F001" / "M_00.npy", [7, 7])  # only the listener was seen
    _save(tmp_path / "Ses01F_impro01_F002_extra_suffix.npy", [4, 4])  # found by prefix
    got = read_feature_folder(tmp_path, ["Ses01F_impro01_M000", "Ses01F_impro01_F001",
                                         "Ses01F_impro01_F002"], ["M", "F", "F"], faces=True)
    np.testing.assert_allclose(got.values, [[2, 2], [0, 0], [4, 4]])
    assert got.empty_faces == 1


def test_cmu_lookup_is_exact_not_prefix(tmp_path):
    _save(tmp_path / "vid_11.npy", [1.0])
    with pytest.raises(DataError, match="no feature file for utterance 'vid_1'"):
        read_feature_folder(tmp_path, ["vid_1"], None)
