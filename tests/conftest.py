"""Shared fixtures: small synthetic datasets written once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from dataloader.synthetic import generate

SHARED_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "labels"
TINY_DIMS = (12, 16, 16)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CMU-MOSI and IEMOCAP (both label sets) at 6 % of the real size with tiny feature dims."""
    root = tmp_path_factory.mktemp("tiny")
    generate("CMUMOSI", root, seed=1, scale=0.06, dims=TINY_DIMS)
    generate("IEMOCAPSix", root, seed=1, scale=0.06, dims=TINY_DIMS)
    return root


def requires_shared_labels(name: str) -> Path:
    """The real label file `name`, or skip the test when ../shared is absent."""
    path = SHARED_LABELS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (real label files live outside the project)")
    return path


def tiny_config(root: Path, output: Path, **overrides):
    """A resolved TrainConfig for the tiny datasets: small model, few epochs, CPU."""
    from MoMKE.config import TrainConfig
    values = dict(dataset="CMUMOSI", data_root=str(root), epochs=4, stage_epochs=2, batch_size=4,
                  hidden=8, depth=1, num_heads=2, lr=1e-3, drop_rate=0.1, seed=3,
                  device="cpu", output_dir=str(output))
    values.update(overrides)
    return TrainConfig(**values).resolved()


def report_tables(output: Path, out: Path) -> dict[str, str]:
    """The report's files for the runs below `output`, with the git commit each table names left
    out: a worker process reads it when it starts, so a commit made while the tests run would
    differ from an in-process sweep's without any number differing (the computing code's version
    stays in)."""
    import re
    from MoMKE.results.report import write_report
    return {p.name: re.sub(r"Code version\(s\): git .*?, computing code",
                           "Code version(s): git <commit>, computing code", p.read_text())
            for p in write_report([output], out, plots=False)}
