"""Label files are unpickled with an allow-list: a hostile file is refused and never runs."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from dataloader.datasets import DataError
from dataloader.labels import load_label_pickle
from tests.conftest import requires_shared_labels


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creating the file proves code ran


class _ImportsModule:
    def __reduce__(self):
        import os
        return (os.system, ("true",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([{"v": ["v_1"]}, _RunsCode(marker)]))
    with pytest.raises(DataError, match=r"evil\.pkl: refused .*(io|builtins)\.open"):
        load_label_pickle(path)
    assert not marker.exists()


def test_pickle_importing_os_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_ImportsModule()))
    with pytest.raises(DataError, match=r"(posix|os)\.system"):
        load_label_pickle(path)


def test_containers_and_numpy_values_load(tmp_path):
    content = [{"v": ["v_1", "v_2"]}, {"v": [np.float64(1.5), np.float64(-0.2)]},
               {"v": np.array(["a", "b"])}, {"v"}, frozenset(), (1, 2.0, True, None)]
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(content, protocol=2))
    loaded = load_label_pickle(path)
    assert loaded[0] == content[0] and loaded[3] == {"v"}
    np.testing.assert_array_equal(loaded[2]["v"], content[2]["v"])


@pytest.mark.parametrize("name", ["CMUMOSI_features_raw_2way.pkl", "IEMOCAP_features_raw_4way.pkl"])
def test_real_label_files_pass_the_allow_list(name):
    content = load_label_pickle(requires_shared_labels(name))
    assert isinstance(content[0], dict) and len(content[0]) in (93, 151)
