"""Write a synthetic dataset in the exact GCNet layout, so a fresh clone can run everything.

What it writes and why: docs/data.md, "The synthetic default". Usage:

    python -m dataloader.synthetic --dataset CMUMOSI --out features/synthetic
    python -m dataloader.synthetic --dataset all --scale 0.05 --dims 16,32,32 --out /tmp/tiny
    python -m dataloader.synthetic --dataset IEMOCAPFour --labels PATH/IEMOCAP_features_raw_4way.pkl

How an utterance's features are made (k = LATENT_DIM latents, d_m-dimensional features; every
noise below is a standard normal draw times the named constant):

    label signal      e(y)     a class prototype (IEMOCAP; exc near hap), or the sentiment score
                               along one direction plus (|y| - 1) along another (CMU)
    shared latent     z = e(y) + SHARED_NOISE * noise       the same in all three modalities
    modality latent   s_m = SIGNAL[m] * z + PRIVATE_NOISE * noise_m
                               SIGNAL: text 1.3 > audio 0.8 > visual 0.5
    features          x_m = s_m @ P_m + style_m(conversation) + FEATURE_NOISE * noise
                               P_m: a random k x d_m map scaled by 1 / sqrt(k); style_m: one
                               offset per conversation, 0.3 times a normal draw

Labels of one conversation are related, so its other utterances carry signal about each one
(context helps): a CMU video draws a mood and each score scatters around it (rounded to steps of
0.2, clipped to [-3, 3]); an IEMOCAP dialogue draws its own mix of five emotions, and a turn keeps
the previous turn's emotion with probability 0.5 (`fru` marks the utterances that only the 6-way
set holds). With `--labels FILE` the real ids, splits, speakers and labels are used instead of
generated ones. A marker file `SYNTHETIC.json` tells the loader, the logs and the reports that the
data is synthetic.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataloader.datasets import DATASETS, DEFAULT_FEATURES, MODALITIES, DatasetSpec, get_spec
from dataloader.datasets import DataError
from dataloader.gcnet import SYNTHETIC_MARKER
from dataloader.labels import read_label_file

log = logging.getLogger(__name__)

LATENT_DIM = 16
SIGNAL = {"t": 1.3, "a": 0.8, "v": 0.5}  # per-modality label strength: text > audio > visual
SHARED_NOISE = 0.45  # noise in the latent shared by all modalities: caps what fusion can reach
PRIVATE_NOISE = 1.0  # per-modality latent noise: what fusing modalities averages away
FEATURE_NOISE = 0.5  # isotropic noise in feature space
STYLE = 0.3  # per-conversation offset (speaker or recording style)
EMPTY_FACE_RATE = 0.03  # IEMOCAP utterances whose speaker's face was never detected

# IEMOCAP 6-way classes (hap, sad, neu, ang, exc, fru) -> 4-way (hap+exc, sad, neu, ang); fru dropped.
SIX_TO_FOUR = {0: 0, 1: 1, 2: 2, 3: 3, 4: 0}


@dataclass
class Conversations:
    """Ids, labels, speakers and splits of a generated (or given) dataset."""

    ids: list[str]
    utterances: list[list[str]]
    labels: list[np.ndarray]
    speakers: list[list[str]]
    splits: list[set[str]]  # (train, val, test) or (train, test)


def generate(dataset: str, out: Path, *, seed: int = 0, scale: float = 1.0,
             dims: tuple[int, int, int] = (512, 1024, 1024), labels: Path | None = None) -> Path:
    """Write the synthetic `dataset` under `out/<DIR>/` and return that folder."""
    spec = get_spec(dataset)
    if not 0 < scale <= 1:
        raise DataError(f"--scale {scale} must be in (0, 1]; use 1 for the real sizes.")
    root = out / spec.folder
    rng = np.random.default_rng([seed, sorted(DATASETS).index(spec.name)])
    if labels is not None:
        given = read_label_file(labels, spec)
        label_sets = {spec.name: _from_label_set(given, spec)}
    elif spec.session_folds:
        label_sets = _iemocap(rng, scale)
    else:
        label_sets = {spec.name: _cmu(rng, spec, scale)}
    if root.exists():
        shutil.rmtree(root)  # a stale mix of old and new files would poison the cache stamp
    root.mkdir(parents=True)
    for name, conversations in label_sets.items():
        _write_labels(root / get_spec(name).label_file, conversations)
    # Features are written once, for the largest label set (IEMOCAP-6 holds IEMOCAP-4's ids).
    source = "IEMOCAPSix" if "IEMOCAPSix" in label_sets else spec.name
    _write_features(root, label_sets[source], get_spec(source), rng, dict(zip(MODALITIES, dims)))
    marker = {"generator": "python -m dataloader.synthetic", "datasets": sorted(label_sets),
              "seed": seed, "scale": scale, "dims": dict(zip(MODALITIES, dims)),
              "labels_from": str(labels) if labels else None,
              "note": "SYNTHETIC DATA: numbers measured on it are not comparable with the paper."}
    (root / SYNTHETIC_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return root


# ----------------------------------------------------------------------------- structure

def _lengths(rng: np.random.Generator, conversations: int, utterances: int,
             max_length: int) -> np.ndarray:
    """Conversation lengths with exactly `utterances` in total and `max_length` as the longest."""
    max_length = min(max_length, utterances - (conversations - 1))
    raw = rng.lognormal(mean=0.0, sigma=0.5, size=conversations)
    lengths = np.clip(np.round(raw / raw.sum() * utterances), 1, max_length).astype(int)
    lengths[np.argmax(lengths)] = max_length
    while lengths.sum() != utterances:
        step = 1 if lengths.sum() < utterances else -1
        candidates = np.flatnonzero((lengths + step >= 1) & (lengths + step < max_length))
        lengths[rng.choice(candidates)] += step
    return lengths


def _scaled(count: int, scale: float, minimum: int) -> int:
    return max(minimum, int(round(count * scale)))


def _cmu(rng: np.random.Generator, spec: DatasetSpec, scale: float) -> Conversations:
    sizes = spec.sizes
    per_split = [_scaled(n, scale, 2) for n in sizes.split_conversations]
    count = sum(per_split)
    lengths = _lengths(rng, count, max(_scaled(sizes.utterances, scale, 4 * count), 2 * count),
                       sizes.max_length)
    ids = [f"syn{spec.name[-4:].lower()}{c:05d}" for c in range(count)]
    order = rng.permutation(count)
    bounds = np.cumsum([0, *per_split])
    splits = [{ids[i] for i in order[bounds[k]:bounds[k + 1]]} for k in range(3)]
    labels, utterances = [], []
    for vid, length in zip(ids, lengths):
        mood = np.clip(rng.normal(0.0, 0.7), -2.5, 2.5)
        scores = np.clip(mood + rng.normal(0.0, 1.2, size=length), -3, 3)
        labels.append((np.round(scores * 5) / 5).astype(np.float64))  # 0.2 steps, some exact zeros
        utterances.append([f"{vid}_{k + 1}" for k in range(length)])
    return Conversations(ids, utterances, labels, [[""] * len(u) for u in utterances], splits)


def _iemocap(rng: np.random.Generator, scale: float) -> dict[str, Conversations]:
    """Both IEMOCAP label sets over one set of dialogues: 4-way is 6-way without `fru`."""
    six, four = DATASETS["IEMOCAPSix"].sizes, DATASETS["IEMOCAPFour"].sizes
    per_session = [_scaled(n, scale, 2) for n in six.split_conversations]
    count = sum(per_session)
    total6 = max(_scaled(six.utterances, scale, 4 * count), 2 * count)
    total4 = max(_scaled(four.utterances, scale, 2 * count), count)
    lengths = _lengths(rng, count, total6, six.max_length)
    ids, speakers, in_four = [], [], []
    for session, dialogues in enumerate(per_session, start=1):
        for d in range(dialogues):
            ids.append(f"Ses0{session}{'FM'[d % 2]}_{'impro' if d % 3 else 'script'}{d:02d}")
    # Choose which utterances the 4-way set keeps: at least one per dialogue, exactly total4.
    keep = np.zeros(total6, dtype=bool)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    keep[starts] = True
    keep[rng.choice(np.flatnonzero(~keep), total4 - count, replace=False)] = True
    labels6, utterances, position = [], [], 0
    for vid, length in zip(ids, lengths):
        spk = list(rng.choice(["F", "M"], size=length))
        mood = rng.dirichlet(np.full(5, 0.6))  # a dialogue leans towards a few emotions
        classes, previous = [], None
        for k in range(length):
            if keep[position + k]:
                if previous is not None and previous != 5 and rng.random() < 0.5:
                    label = previous  # emotions persist from one turn to the next
                else:
                    label = int(rng.choice(5, p=mood))
            else:
                label = 5  # fru: in the 6-way set only
            classes.append(label)
            previous = label
        counters = {"F": 0, "M": 0}
        names = []
        for s in spk:
            names.append(f"{vid}_{s}{counters[s]:03d}")
            counters[s] += 1
        labels6.append(np.array(classes, dtype=np.int64))
        utterances.append(names)
        speakers.append(spk)
        in_four.append(keep[position:position + length])
        position += length
    train = {vid for vid in ids if vid[4] != "5"}
    test = {vid for vid in ids if vid[4] == "5"}
    result = {"IEMOCAPSix": Conversations(ids, utterances, labels6, speakers, [train, test])}
    result["IEMOCAPFour"] = Conversations(
        ids, [[u for u, k in zip(us, ks) if k] for us, ks in zip(utterances, in_four)],
        [np.array([SIX_TO_FOUR[c] for c, k in zip(cs, ks) if k], dtype=np.int64)
         for cs, ks in zip(labels6, in_four)],
        [[s for s, k in zip(ss, ks) if k] for ss, ks in zip(speakers, in_four)],
        [train, test])
    return result


def _from_label_set(given, spec: DatasetSpec) -> Conversations:
    ids = list(given.conversation_ids)
    names = ("train", "val", "test") if spec.has_validation else ("train", "test")
    if not spec.session_folds:
        fold = given.folds[0]
        splits = [{ids[i] for i in getattr(fold, n)} for n in names]
    else:  # IEMOCAP files name a train/test split; keep it (session 5 is the official test set)
        splits = [{vid for vid in ids if vid[4] != "5"}, {vid for vid in ids if vid[4] == "5"}]
    return Conversations(ids, [list(u) for u in given.utterance_ids],
                         [np.asarray(lab) for lab in given.labels],
                         [list(s) for s in given.speakers], splits)


def _write_labels(path: Path, conversations: Conversations) -> None:
    ids = conversations.ids
    as_dict = lambda values: {vid: list(v) for vid, v in zip(ids, values)}  # noqa: E731
    sentences = {vid: [f"synthetic utterance {k + 1}" for k in range(len(u))]
                 for vid, u in zip(ids, conversations.utterances)}
    content = [as_dict(conversations.utterances), as_dict(conversations.labels),
               as_dict(conversations.speakers), sentences, *conversations.splits]
    with path.open("wb") as handle:
        pickle.dump(content, handle, protocol=4)


# ----------------------------------------------------------------------------- features

def _label_signal(rng: np.random.Generator, labels: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """e(y): (N, LATENT_DIM). Classes get prototypes; 6-way exc sits near hap, as in 4-way."""
    if spec.is_regression:
        directions = rng.normal(size=(2, LATENT_DIM))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        y = labels.astype(np.float64)[:, None]
        return 1.2 * y * directions[0] / 1.5 + 0.3 * (np.abs(y) - 1.0) * directions[1]
    prototypes = rng.normal(size=(max(spec.num_classes, 6), LATENT_DIM)) * 0.45
    prototypes[4] = prototypes[0] + 0.35 * rng.normal(size=LATENT_DIM)  # exc ~ hap
    return prototypes[labels]


def _write_features(root: Path, conversations: Conversations, spec: DatasetSpec,
                    rng: np.random.Generator, dims: dict[str, int]) -> None:
    labels = np.concatenate(conversations.labels)
    lengths = [len(u) for u in conversations.utterances]
    n = labels.shape[0]
    conversation_of = np.repeat(np.arange(len(lengths)), lengths)
    shared = _label_signal(rng, labels, spec) + SHARED_NOISE * rng.normal(size=(n, LATENT_DIM))
    features = {}
    for m in MODALITIES:
        latent = SIGNAL[m] * shared + PRIVATE_NOISE * rng.normal(size=(n, LATENT_DIM))
        mixing = rng.normal(size=(LATENT_DIM, dims[m])) / np.sqrt(LATENT_DIM)
        style = STYLE * rng.normal(size=(len(lengths), dims[m]))
        noise = FEATURE_NOISE * rng.normal(size=(n, dims[m]))
        features[m] = (latent @ mixing + style[conversation_of] + noise).astype(np.float32)
    utterance_ids = [u for us in conversations.utterances for u in us]
    speakers = [s for ss in conversations.speakers for s in ss]
    iemocap = spec.session_folds
    for m in MODALITIES:
        folder = root / "features" / DEFAULT_FEATURES[m]
        folder.mkdir(parents=True)
        for i, uid in enumerate(utterance_ids):
            if m == "v" and iemocap:
                _write_faces(folder / uid, features[m][i], speakers[i], features[m], rng)
            else:
                np.save(folder / f"{uid}.npy", _file_shape(features[m][i], rng))


def _file_shape(vector: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Store a vector as [dim], [1, dim] or [T, dim] frames whose mean is the vector."""
    kind = rng.integers(3)
    if kind == 0:
        return vector
    if kind == 1:
        return vector[None, :]
    jitter = rng.normal(scale=0.2, size=vector.shape).astype(np.float32)
    return np.stack([vector + jitter, vector - jitter])


def _write_faces(folder: Path, vector: np.ndarray, speaker: str, pool: np.ndarray,
                 rng: np.random.Generator) -> None:
    """A face folder: the speaker's faces carry the utterance; the listener's faces do not."""
    folder.mkdir()
    listener = "M" if speaker == "F" else "F"
    own = 0 if rng.random() < EMPTY_FACE_RATE else int(rng.integers(1, 4))
    other = pool[rng.integers(len(pool))]  # the listener shows somebody else's state
    for k in range(own):
        np.save(folder / f"{speaker}_{k:02d}.npy", vector + 0.1 * rng.normal(size=vector.shape)
                .astype(np.float32))
    for k in range(int(rng.integers(0, 3))):
        np.save(folder / f"{listener}_{k:02d}.npy", other + 0.1 * rng.normal(size=other.shape)
                .astype(np.float32))


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataloader.synthetic",
        description="Write a synthetic dataset in the GCNet layout (SYNTHETIC: not paper data).")
    parser.add_argument("--dataset", required=True, choices=[*DATASETS, "all"],
                        help="which dataset to generate; IEMOCAPFour and IEMOCAPSix share the "
                             "IEMOCAP folder and are written together unless --labels is given")
    parser.add_argument("--out", type=Path, default=Path("features"),
                        help="data root to write <DIR>/ into (default: features; the run scripts "
                             "use features/synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the real number of conversations and utterances, in "
                             "(0, 1] (default: 1, the real sizes)")
    parser.add_argument("--dims", default="512,1024,1024",
                        help="audio,text,visual feature dimensions (default: GCNet's 512,1024,1024)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="a real GCNet label file whose ids, splits, speakers and labels to "
                             "use (one dataset only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dims = tuple(int(d) for d in args.dims.split(","))
        if len(dims) != 3 or min(dims) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--dims {args.dims!r} must be three positive integers such as 512,1024,1024")
    if args.labels is not None and args.dataset == "all":
        parser.error("--labels belongs to one dataset; name it with --dataset")
    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    if args.labels is None and "IEMOCAPFour" in names and "IEMOCAPSix" in names:
        names.remove("IEMOCAPFour")  # one IEMOCAP folder holds both label files
    try:
        for name in names:
            root = generate(name, args.out, seed=args.seed, scale=args.scale, dims=dims,
                            labels=args.labels)
            log.info("wrote SYNTHETIC %s to %s", name if args.labels else
                     json.loads((root / SYNTHETIC_MARKER).read_text())["datasets"], root)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
