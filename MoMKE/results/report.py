"""Paper-style tables and plots from saved run folders.

    python -m MoMKE.report saved/            # every complete run below saved/
    python -m MoMKE.report saved/CMUMOSI --out reports/

Runs are found by their `result.json` (never by folder names) and grouped by
dataset, data source and hyperparameters. Each group gets a Markdown and a CSV file: MoMKE's rows
(the seven fixed conditions and the missing rates, each with averages; columns: the dataset's
metrics under each epoch-selection rule; seeds as mean ± std) with the published numbers and our
difference beside the paper-protocol column; then, where they were run, the unified model beside
the per-condition models, the ablation table, and the router weights. Synthetic data is announced
in every header and plot title.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence


from dataloader.atomic import NoSpace, write_atomic, write_errors_named
from dataloader.datasets import get_spec
from MoMKE.results.arithmetic import arithmetic_comparisons
from MoMKE.results.collect import collect, group
from MoMKE.results.intervals import Intervals
from MoMKE.results.robustness import (plot_matrix, robustness_csv, robustness_matrices,
                                      robustness_section)
from MoMKE.results.render import csv_text
from MoMKE.results.rows import mae_corr_mode, table_rows, variant, with_nonzero_mae_corr
from MoMKE.results.tables import markdown


def write_report(paths: Sequence[Path], out: Path, *, plots: bool = True, mae_corr: str = "auto",
                 ci: bool = False, resamples: int = 1000,
                 skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Write tables (and plots) for every group of runs below `paths`; return the files.
    `mae_corr`: all, nonzero or auto (see `mae_corr_mode`). Folders it could not use are
    appended to `skipped` as (folder, why)."""
    found = collect(paths)
    groups = group(found.results)
    check_writable(out)
    written = []
    datasets = [key[0] for key in groups]
    for key, members in groups.items():
        prefix = key[0] if datasets.count(key[0]) == 1 else f"{key[0]}-{key[1]}-{key[2]}"
        try:
            mode = mae_corr_mode(mae_corr, members) if "mae" in get_spec(key[0]).metrics \
                else "all"
            if mode == "nonzero":
                members = [with_nonzero_mae_corr(r) for r in members]
            rows = table_rows([r for r in members if variant(r) == "MoMKE"])
            intervals = Intervals(key[0], mode, resamples) if ci else None
            matrices = robustness_matrices(key[0], members, resamples=resamples)
            tables = (markdown(key, members, rows, mode, intervals)
                      + "\n".join(robustness_section(key[0], matrices) + [""]),
                      csv_text(key, members, mode, intervals))
        except Exception as error:  # noqa: BLE001 - one odd group must not cost the others
            found.skipped += [(r["folder"], f"its group {prefix} could not be tabulated "
                                            f"({type(error).__name__}: {error})") for r in members]
            continue
        write_atomic(out / f"{prefix}.md", tables[0])
        write_atomic(out / f"{prefix}.csv", tables[1])
        written += [out / f"{prefix}.md", out / f"{prefix}.csv"]
        if matrices:
            write_atomic(out / f"{prefix}_robustness.csv", robustness_csv(key[0], matrices))
            written.append(out / f"{prefix}_robustness.csv")
        if plots:
            from MoMKE.results.plots import plot_group  # matplotlib only when plotting
            written += plot_group(key, members, rows, out, prefix)
            several = len({m.data for m in matrices}) > 1  # evaluated on several data copies
            written += [plot_matrix(key[0], m, out / f"{prefix}_robustness_{m.kind}"
                                    f"{f'_{m.data[0]}-{m.data[1][:8]}' if several else ''}.png")
                        for m in matrices]
    for stem, lines in arithmetic_comparisons(found.results).items():
        write_atomic(out / f"{stem}.md", "\n".join(lines) + "\n")
        written.append(out / f"{stem}.md")
    if skipped is not None:
        skipped.extend(found.skipped)
    return written


def check_writable(out: Path) -> None:
    """Raise OSError unless files can be created in `out` (made when absent), before any table
    is computed: the default output lies inside the runs, which may be read-only."""
    with write_errors_named(out):
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MoMKE.report", allow_abbrev=False,
                                     description="Tables and plots from saved MoMKE runs.")
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("saved")],
                        help="run folders or folders above them (default: saved)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the tables and plots (default: <first path>/report)")
    parser.add_argument("--no-plots", action="store_true", help="write tables only")
    parser.add_argument("--mae-corr", choices=["auto", "all", "nonzero"], default="auto",
                        help="MAE and Corr on all utterances (MMSA) or on non-zero labels (the "
                             "official code); auto: nonzero for runs trained with --official, "
                             "else all (default)")
    parser.add_argument("--ci", action="store_true",
                        help="add 95 %% bootstrap intervals (over test conversations) to every "
                             "cell, paired intervals to the comparisons, and the selection "
                             "optimism (needs the runs' predictions.npz)")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples with --ci (default: 1000)")
    args = parser.parse_args(argv)
    if args.resamples < 1:
        print(f"error: --resamples {args.resamples} must be at least 1, e.g. 1000.",
              file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"error: {missing[0]} does not exist; pass the output folder of your runs.",
              file=sys.stderr)
        return 2
    skipped: list[tuple[str, str]] = []
    out = args.out or args.paths[0] / "report"
    try:
        check_writable(out)
        written = write_report(args.paths, out, plots=not args.no_plots, mae_corr=args.mae_corr,
                               ci=args.ci, resamples=args.resamples, skipped=skipped)
    except NoSpace as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        why = os.strerror(error.errno) if error.errno else str(error)
        fix = "choose a folder you can write to" if args.out else \
            (f"write the report elsewhere with `python -m MoMKE.report "
             f"{' '.join(map(str, args.paths))} --out DIR`")
        print(f"error: {out} cannot be written ({why}); {fix}.", file=sys.stderr)
        return 2
    for folder, why in skipped:
        print(f"skipped {folder}: {why}", file=sys.stderr)
    if not written:
        print(f"error: no complete run (result.json) below {', '.join(map(str, args.paths))}.",
              file=sys.stderr)
        return 2
    for path in written:
        if path.suffix == ".md":
            print(path.read_text())
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
