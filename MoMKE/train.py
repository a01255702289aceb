"""Train and evaluate MoMKE: `python -m MoMKE.train --dataset CMUMOSI --test-condition a,t,atv`.

Method: docs/method.md. One run folder per (dataset, condition or rate, seed), each run training
stage 1 then stage 2 on every fold (`MoMKE.runner.run`). `--help` lists every flag.
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from dataloader.datasets import DataError
from dataloader.gcnet import feature_names_from, load_dataset
from MoMKE.config import ConfigError, config_to_yaml, parse_config
from MoMKE.protocols import settings_from
from MoMKE.runlog import check_output_dir, setup_console_logging
from MoMKE.runtime import resolve_device
from MoMKE.runner import STATED_FAILURES, RunSpec, as_run_on, pending_runs, run
from MoMKE.trainer import Diverged

log = logging.getLogger("MoMKE")


def main(argv: Sequence[str] | None = None) -> int:
    setup_console_logging()
    try:
        return _train(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: earlier results are kept, complete runs are skipped; run the same "
              "command again to train the rest.", file=sys.stderr)
        return 130


def _train(argv: Sequence[str] | None) -> int:
    try:
        config = parse_config(argv)
        device = resolve_device(config.device)
        check_output_dir(config.output_dir, config.dataset)
        data = load_dataset(config.dataset, config.data_root, feature_names_from(
            config.audio_feature, config.text_feature, config.video_feature))
        settings = settings_from(config.test_condition, config.missing_rate,
                                 config.train_missing)
        runs = [RunSpec(as_run_on(config, device), setting, data.fingerprint)
                for setting in settings]
        check_output_dir(config.output_dir, config.dataset, len(pending_runs(runs)))
    except (ConfigError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log.info("resolved configuration:\n%s", config_to_yaml(config).rstrip())
    log.info("%s", data.describe())
    if data.data_source == "synthetic":
        log.warning("SYNTHETIC DATA (%s): every number below is measured on generated features "
                    "and is not comparable with the paper", data.root)
    failed = 0
    for setting in settings:
        try:
            run(config, data, setting, device)
        except Diverged:  # logged by `run`, console included
            failed += 1
        except STATED_FAILURES as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
