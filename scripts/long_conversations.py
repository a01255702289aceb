"""Peak memory and epoch time of training on one long synthetic conversation.

Each size trains in a fresh process (so its peak resident memory, ru_maxrss, is its own): one
conversation of N utterances, all modalities observed, one stage-1 and one stage-2 epoch through
`FoldTrainer`, as a run does (no validation or test split). Uses only what the code before the
long-conversation change (commit 8e89c9c) has too, so the same script measures both:

    python scripts/long_conversations.py                       # this checkout: 1,000 3,000 6,000
    python scripts/long_conversations.py --code /path/to/before --sizes 200
    python scripts/long_conversations.py --attention           # the two attention paths alone

`--attention` times attention alone (forward and backward, 2 heads of 128) on the explicit path
and on the per-conversation fused path, for rows like CMU-MOSI's and IEMOCAP's and longer ones:
what `LONG_ROW` (MoMKE/layout.py) is set from. Timings mean something only on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROWS = "32x24,16x110,8x256,4x512,2x1024,1x3000"  # rows x utterances: MOSI, IEMOCAP, longer


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def one(utterances: int, args: argparse.Namespace) -> dict:
    """Train one conversation of `utterances` in this process; its figures."""
    from dataloader.batch import BatchBuilder
    from dataloader.datasets import get_spec
    from dataloader.gcnet import MultimodalDataset
    from dataloader.labels import Fold
    from MoMKE.config import TrainConfig
    from MoMKE.protocols import MissingSetting
    from MoMKE.trainer import FoldTrainer

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    dims = [int(d) for d in args.dims.split(",")]
    data = MultimodalDataset(
        spec=get_spec("CMUMOSI"), data_source="synthetic", root=Path("long-conversation"),
        feature_names=dict(zip("atv", ("a", "t", "v"))), conversation_ids=("c0",),
        offsets=np.array([0, utterances]), utterance_ids=np.array(
            [f"c0_{i}" for i in range(utterances)]), speakers=np.array(["A"] * utterances),
        labels=rng.uniform(-3, 3, utterances).astype(np.float32),
        features={m: rng.standard_normal((utterances, d)).astype(np.float32)
                  for m, d in zip("atv", dims)},
        folds=(Fold("1", train=(0,), val=(), test=()),))
    config = TrainConfig(dataset="CMUMOSI", epochs=2, stage_epochs=1, batch_size=1,
                         hidden=args.hidden, depth=args.depth, num_heads=args.heads,
                         attn_drop_rate=args.attn_drop_rate, device="cpu", threads=args.threads,
                         save_checkpoint=False, reuse_stage1=False).resolved()
    device = torch.device("cpu")
    trainer = FoldTrainer(config, data, 0, MissingSetting("fixed", condition="atv"), device,
                          BatchBuilder(data, device))
    before = _rss_mb()
    records: list[dict] = []
    trainer.run(records.append)
    figures = {"utterances": utterances, "peak_mb": _rss_mb(), "before_mb": before,
               "epoch_s": [r["seconds"] for r in records]}
    try:  # the estimate the run is checked with (absent from the code before)
        from MoMKE.memory import chunk_peak_bytes
        figures["estimate_mb"] = chunk_peak_bytes([utterances], config, data.dims) / 2**20
    except ImportError:
        pass
    return figures


def sizes_table(args: argparse.Namespace) -> None:
    print(f"code: {args.code}; one conversation, hidden {args.hidden}, depth {args.depth}, "
          f"{args.heads} heads, dims {args.dims}, {args.threads} threads, one stage-1 and one "
          f"stage-2 epoch (torch {torch.__version__}, {os.cpu_count()} cores)")
    print("| utterances | peak RSS MB | over start MB | estimate MB | stage-1 epoch s "
          "| stage-2 epoch s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in [int(s) for s in args.sizes.split(",")]:
        command = [sys.executable, __file__, "--one", str(n), *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"| {n} | failed: {done.stderr.strip().splitlines()[-1:]} |")
            continue
        f = json.loads(done.stdout.strip().splitlines()[-1])
        estimate = f"{f['estimate_mb']:.0f}" if "estimate_mb" in f else "-"
        print(f"| {n} | {f['peak_mb']:.0f} | {f['peak_mb'] - f['before_mb']:.0f} | {estimate} "
              f"| {f['epoch_s'][0]:.2f} | {f['epoch_s'][1]:.2f} |", flush=True)


def attention_table(args: argparse.Namespace) -> None:
    """Median seconds of forward and backward of one attention layer, both paths."""
    import MoMKE.layout as layout
    from MoMKE.model import Attention, ModelConfig

    torch.set_num_threads(args.threads)
    attention = Attention(ModelConfig(input_dims=(1, 1, 1), num_outputs=1, hidden=256,
                                      num_heads=2))
    print(f"attention alone, 2 heads of 128, forward + backward, {args.threads} threads, "
          f"median of {args.repeats}")
    print("| rows x utterances | explicit s | per conversation s | explicit / fused |")
    print("|---|---:|---:|---:|")
    for rows, length in (map(int, case.split("x")) for case in args.rows.split(",")):
        x = torch.randn(rows * length, 256, requires_grad=True)
        seconds = {}
        for path, threshold in (("explicit", 10**9), ("fused", 0)):
            layout.LONG_ROW = threshold
            packed = layout.TokenLayout.from_masks(torch.ones(rows, length, 3, dtype=torch.bool),
                                                   torch.zeros(rows, length, dtype=torch.bool)
                                                   ).packed_rows(["a"])
            times = []
            for _ in range(args.repeats + 1):  # the first warms up
                started = time.perf_counter()
                attention(x, packed).sum().backward()
                times.append(time.perf_counter() - started)
            seconds[path] = statistics.median(times[1:])
        print(f"| {rows} x {length} | {seconds['explicit']:.4f} | {seconds['fused']:.4f} "
              f"| {seconds['explicit'] / seconds['fused']:.2f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,3000,6000", help="utterances, comma list")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dims", default="64,64,64", help="audio,text,visual feature sizes")
    parser.add_argument("--attn-drop-rate", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", action="store_true", help="time attention alone")
    parser.add_argument("--rows", default=ROWS, help="with --attention: rows x utterances, "
                        "comma list")
    parser.add_argument("--repeats", type=int, default=5, help="with --attention")
    parser.add_argument("--code", default=str(Path(__file__).resolve().parents[1]),
                        help="the checkout whose code is measured (default: this script's)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one size, this process
    args, _ = parser.parse_known_args()
    sys.path.insert(0, str(Path(args.code).resolve()))
    if args.one is not None:
        print(json.dumps(one(args.one, args)))
    elif args.attention:
        attention_table(args)
    else:
        sizes_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
