"""What knowing the data by its content costs: the feature cache's build and the quick check.

    python scripts/cache_cost.py --data-root features/synthetic --dataset CMUMOSEI --repeat 2

Each repeat removes the dataset's feature cache and loads the dataset (reading every feature file
once, hashing its bytes, writing the cache: the build), then times the warm "unchanged?" check a
sweep makes when it plans (`data_fingerprint`: the stat of every file and the cache's header) and
a warm load from the cache. The first build may read from disk, later ones from the page cache.
Prints a Markdown table; the cache is left built.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloader.cache import cache_path, scan_files  # noqa: E402
from dataloader.datasets import DATASETS, MODALITIES, get_spec  # noqa: E402
from dataloader.gcnet import data_fingerprint, feature_names_from, load_dataset  # noqa: E402


def _seconds(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure(dataset: str, data_root: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds per repeat of: the cache build, the warm unchanged check, the warm load."""
    spec = get_spec(dataset)
    names = feature_names_from()
    cache_file = cache_path(data_root / spec.folder, spec.name, [names[m] for m in MODALITIES])
    times: dict[str, list[float]] = {"cache build (read, hash, write)": [],
                                     "unchanged check, warm (data_fingerprint)": [],
                                     "load from the cache, warm": []}
    build, check, load = times.values()
    for _ in range(repeat):
        cache_file.unlink(missing_ok=True)
        build.append(_seconds(lambda: load_dataset(dataset, data_root, names)))
        check.append(_seconds(lambda: data_fingerprint(dataset, data_root, names)))
        load.append(_seconds(lambda: load_dataset(dataset, data_root, names)))
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/cache_cost.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("features"),
                        help="the folder holding <DIR>/ of the dataset (default: features)")
    parser.add_argument("--dataset", choices=list(DATASETS), default="CMUMOSI")
    parser.add_argument("--repeat", type=int, default=2, help="builds to time (default: 2)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat} must be at least 1")
    spec = get_spec(args.dataset)
    times = measure(args.dataset, args.data_root, args.repeat)
    data = load_dataset(args.dataset, args.data_root)
    folders = [data.root / "features" / data.feature_names[m] for m in MODALITIES]
    entries = scan_files(folders).entries
    print(f"{spec.name} at {data.root}: {data.num_utterances} utterances, {entries} feature "
          f"files and folders; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    print()
    print("| seconds | " + " | ".join(f"repeat {k + 1}" for k in range(args.repeat)) + " | min |")
    print("|---|" + "---|" * (args.repeat + 1))
    for what, values in times.items():
        print(f"| {what} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {min(values):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
