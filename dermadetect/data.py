"""Load HAM10000-style data through `datasets`, validate it, split it by lesion, and build transforms.

Every source becomes the same table: image, image_id, lesion_id, dx (+ whatever metadata it has).
"""

from __future__ import annotations

import csv
import ctypes
import io
import logging
import multiprocessing
import os
import random
import re
import signal
import sys
import warnings
import weakref
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image as PILImage
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from sklearn.utils.class_weight import compute_class_weight
from timm.data import create_transform, resolve_model_data_config
from torchvision import transforms as T

from .config import DataConfig
from .labels import HAM10000_CLASSES, accepted_spellings, ham10000_code
from .shift import RandomShift
from .transfer import without_xet

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "image_id", "lesion_id", "dx")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_NAMES = ("train", "validation", "test")
MAX_LISTED_PROBLEMS = 20
VALIDATION_CHUNK = 256  # encoded images in memory at once while checking them (a few MB of JPEG)


class BadDataError(ValueError):
    """The data has rows that cannot be used; the message lists them."""


class LesionLeakError(RuntimeError):
    """A lesion appears in more than one split."""


@dataclass(frozen=True)
class BadRow:
    split: str
    row: int
    image_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.split}[{self.row}] image_id={self.image_id}: {self.reason}"


@dataclass
class LesionData:
    """The train/validation/test splits of one source, validated and split by lesion."""
    splits: dict[str, datasets.Dataset]
    label_names: tuple[str, ...]
    source: str
    grouped_by_lesion: bool
    test_description: str
    dropped: list[BadRow] = field(default_factory=list)

    def labels(self, split: str) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.label_names)}
        return np.array([index[dx] for dx in self.splits[split]["dx"]], dtype=np.int64)

    def class_counts(self, split: str) -> np.ndarray:
        return np.bincount(self.labels(split), minlength=len(self.label_names))

    def split_rows(self) -> list[tuple[str, str, str, str]]:
        """(image_id, lesion_id, dx, split) of every image: the rows of splits.csv."""
        return [(image_id, lesion_id, dx, name) for name in SPLIT_NAMES
                for image_id, lesion_id, dx in zip(self.splits[name]["image_id"], self.splits[name]["lesion_id"],
                                                   self.splits[name]["dx"])]

    def write_splits_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_id", "lesion_id", "dx", "split"])
            writer.writerows(self.split_rows())


# ---------------------------------------------------------------- sources

def load_source(cfg: DataConfig) -> tuple[dict[str, datasets.Dataset], str, bool]:
    """Read the configured source: ({split: table}, description, has_lesion_ids), labels in HAM10000 codes.

    A split named "test" is the held-out benchmark and is kept; everything else is pooled under "train"
    and later cut into train and validation by lesion.
    """
    if bool(cfg.data_dir) == bool(cfg.dataset):
        raise BadDataError("give exactly one data source: --data-dir DIR or --dataset HUB_ID")
    if cfg.dataset:  # relabelled before its duplicates are dropped
        return _load_hub_dataset(cfg.dataset), f"hub:{cfg.dataset}", True
    root = Path(cfg.data_dir).expanduser().resolve()
    if not root.is_dir():
        raise BadDataError(f"data directory {root} does not exist")
    split_dirs = _split_dirs(root)
    if (root / "metadata.csv").is_file() or any((d / "metadata.csv").is_file() for d in split_dirs.values()):
        tables, source, has_lesion_ids = _load_imagefolder_with_metadata(root, split_dirs), f"imagefolder:{root}", True
    elif (root / "HAM10000_metadata.csv").is_file():
        tables, source, has_lesion_ids = {"train": _load_raw_ham10000(root)}, f"ham10000-raw:{root}", True
    else:
        tables, source, has_lesion_ids = _load_class_folders(root, split_dirs), f"class-folders:{root}", False
    return to_ham10000_codes(tables, has_lesion_ids), source, has_lesion_ids


@without_xet()
def _load_hub_dataset(name: str) -> dict[str, datasets.Dataset]:
    """A Hub dataset such as marmal88/skin_cancer. Its published splits overlap, so all are pooled and
    duplicate image_ids dropped; the split is then redone by lesion."""
    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # network, auth, missing repo: say what to do instead
        raise BadDataError(
            f"could not load dataset {name!r} through `datasets` ({type(exc).__name__}: {exc}). "
            "Check the network or HF_TOKEN, or use a local copy with --data-dir DIR") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in loaded[next(iter(loaded))].column_names]
    if missing:
        raise BadDataError(f"dataset {name!r} lacks the columns {missing}; need {list(REQUIRED_COLUMNS)}")
    pooled = to_ham10000_codes({"train": datasets.concatenate_datasets([loaded[s] for s in loaded])}, True)["train"]
    seen, keep = set(), []
    for i, image_id in enumerate(pooled["image_id"]):
        if image_id not in seen:
            seen.add(image_id)
            keep.append(i)
    if len(keep) < len(pooled):
        logger.info("%s: %d rows across its published splits, %d distinct image_ids kept",
                    name, len(pooled), len(keep))
    return {"train": _normalise(pooled.select(keep))}


def _split_dirs(root: Path) -> dict[str, Path]:
    """Sub-folders named like a split (train, Train, val, validation, test...), case-insensitively."""
    aliases = {"train": "train", "training": "train", "val": "train", "valid": "train", "validation": "train",
               "test": "test", "testing": "test"}  # the value: which table the folder's rows go to
    found: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        kind = aliases.get(child.name.lower())
        if child.is_dir() and kind:
            found[child.name] = child
    return found


def _load_imagefolder_with_metadata(root: Path, split_dirs: dict[str, Path]) -> dict[str, datasets.Dataset]:
    """imagefolder layout with metadata.csv (file_name + HAM10000 columns), at the top or per split folder.

    Rows are read from metadata.csv rather than from the files found, so that a row whose file is
    missing is reported, not silently dropped."""
    folders = {"train": [root]} if (root / "metadata.csv").is_file() else {}
    for name, folder in split_dirs.items():
        if (folder / "metadata.csv").is_file():
            kind = "test" if name.lower().startswith("test") else "train"
            folders.setdefault(kind, []).append(folder)
    tables = {}
    for kind, dirs in folders.items():
        parts = [_table_from_csv(d / "metadata.csv", lambda row, d=d: d / row["file_name"]) for d in dirs]
        tables[kind] = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return tables


def write_compact_copy(source: Path, target: Path, quality: int = 85) -> tuple[int, int]:
    """Copy an imagefolder dataset with metadata.csv to `target` with every image re-encoded as lossy WebP
    (same size, same metadata rows, file_name pointing at the new file): a few times smaller, for shipping
    a training set to a machine with a transfer limit. Returns (images, bytes written)."""
    count, size = 0, 0
    folders = [source] if (source / "metadata.csv").is_file() else list(_split_dirs(source).values())
    for folder in folders:
        out = target / folder.relative_to(source)
        out.mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            name = str(Path(row["file_name"]).with_suffix(".webp"))
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            with PILImage.open(folder / row["file_name"]) as im:
                im.convert("RGB").save(out / name, "WEBP", quality=quality, method=6)
            row["file_name"] = name
            count, size = count + 1, size + (out / name).stat().st_size
        with open(out / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return count, size


def _load_raw_ham10000(root: Path) -> datasets.Dataset:
    """The raw HAM10000 download: HAM10000_metadata.csv and the image folders (part_1, part_2...)."""
    files = {p.stem: p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    return _table_from_csv(root / "HAM10000_metadata.csv",
                           lambda row: files.get(row["image_id"], root / f"{row['image_id']}.jpg"))


def _table_from_csv(csv_path: Path, image_path) -> datasets.Dataset:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise BadDataError(f"{csv_path} has no rows")
    missing = [c for c in ("image_id", "lesion_id", "dx") if c not in rows[0]]
    if missing:
        raise BadDataError(f"{csv_path} lacks the columns {missing}; need image_id, lesion_id, dx")
    columns = {key: [row[key] or "" for row in rows] for key in rows[0] if key != "file_name"}
    columns["image"] = [str(image_path(row)) for row in rows]
    table = datasets.Dataset.from_dict(columns)
    return _normalise(table.cast_column("image", datasets.Image()))


def _load_class_folders(root: Path, split_dirs: dict[str, Path]) -> dict[str, datasets.Dataset]:
    """A class-per-folder tree (root/<class>/img or root/{Train,Test}/<class>/img): labels from folder names.
    There are no lesion ids, so each image stands for its own lesion."""
    data_files = {}
    for name, folder in split_dirs.items():
        kind = "test" if name.lower().startswith("test") else "train"
        data_files.setdefault(kind, []).append(f"{folder}/**")
    if not data_files:
        data_files = {"train": f"{root}/**"}
    loaded = datasets.load_dataset("imagefolder", data_files=data_files)
    tables = {}
    for split, table in loaded.items():
        names = table.features["label"].names
        paths = table.cast_column("image", datasets.Image(decode=False))["image"]
        ids = [Path(p["path"]).stem for p in paths]
        table = table.add_column("image_id", ids).add_column("lesion_id", ids)
        table = table.add_column("dx", [names[i] for i in table["label"]]).remove_columns("label")
        tables["test" if split == "test" else "train"] = _normalise(table)
    return tables


def _normalise(table: datasets.Dataset) -> datasets.Dataset:
    for column in ("image_id", "lesion_id", "dx"):
        if table.features[column].dtype != "string":
            table = table.cast_column(column, datasets.Value("string"))
    return table


# ---------------------------------------------------------------- validation

def to_ham10000_codes(tables: dict[str, datasets.Dataset], has_lesion_ids: bool) -> dict[str, datasets.Dataset]:
    """Rewrite dx in HAM10000 codes, whichever spelling the source uses. Metadata sources are HAM10000, so a label
    that does not map stays as it is for `validate` to report; class folders are HAM10000 only when every folder
    name maps (the ISIC 9-class layout has classes HAM10000 lacks and keeps its own names)."""
    def code(dx):  # a missing label stays missing, for validate to report
        return ham10000_code(dx) if isinstance(dx, str) else None

    labels = {dx for table in tables.values() for dx in set(table["dx"])}
    if not has_lesion_ids and not all(code(dx) for dx in labels):
        return tables
    # on a table without an indices mapping (before any select) add_column leaves the image bytes where they
    # are; map() would rewrite the whole table
    return {split: table.remove_columns("dx").add_column("dx", [code(dx) or dx for dx in table["dx"]])
            for split, table in tables.items()}


def validate(tables: dict[str, datasets.Dataset], allowed_labels: set[str] | None,
             skip_bad_images: bool) -> tuple[dict[str, datasets.Dataset], list[BadRow]]:
    """Find every row that cannot be used: missing or unreadable image, unknown label, duplicate or empty
    image_id, empty lesion_id.

    Raise one BadDataError listing them, or with skip_bad_images drop them and return what was dropped."""
    bad: list[BadRow] = []
    seen: dict[str, str] = {}
    for split, table in tables.items():
        for row, (image_id, lesion_id, dx) in enumerate(zip(table["image_id"], table["lesion_id"], table["dx"])):
            if not (lesion_id or "").strip():  # blank ids would pool into one "lesion" and skew the lesion split
                bad.append(BadRow(split, row, image_id, "empty lesion_id"))
            if not image_id:
                bad.append(BadRow(split, row, image_id, "empty image_id"))
            elif image_id in seen:
                bad.append(BadRow(split, row, image_id, f"duplicate image_id (also in {seen[image_id]})"))
            else:
                seen[image_id] = split
            if allowed_labels is not None and dx not in allowed_labels:
                bad.append(BadRow(split, row, image_id, f"unknown label {dx!r}"))
        # the encoded images a chunk at a time: a whole column of them (2.8 GB for marmal88's) would sit in memory
        undecoded = table.select_columns(["image_id", "image"]).cast_column("image", datasets.Image(decode=False))
        with ThreadPoolExecutor(max_workers=4) as pool:
            for start in range(0, len(undecoded), VALIDATION_CHUNK):
                chunk = undecoded[start:start + VALIDATION_CHUNK]
                problems = pool.map(image_problem, chunk["image"])
                for row, (image_id, problem) in enumerate(zip(chunk["image_id"], problems), start):
                    if problem:
                        bad.append(BadRow(split, row, image_id, problem))
    if not bad:
        return tables, []
    listing = "\n  ".join(str(b) for b in bad[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(bad) - MAX_LISTED_PROBLEMS} more" if len(bad) > MAX_LISTED_PROBLEMS else ""
    if any(b.reason.startswith("unknown label") for b in bad):
        more += f"\nAccepted labels (any case, '_' or '-' for spaces): {accepted_spellings()}"
    if not skip_bad_images:
        raise BadDataError(f"{len(bad)} bad row(s) in the data:\n  {listing}{more}\n"
                           "Fix or remove them, or pass --skip-bad-images to drop them (they are reported).")
    logger.warning("dropping %d bad row(s):\n  %s%s", len(bad), listing, more)
    drop = {(b.split, b.row) for b in bad}
    kept = {split: table.select([i for i in range(len(table)) if (split, i) not in drop])
            for split, table in tables.items()}
    return kept, bad


def image_problem(image: dict) -> str | None:
    """Why an image entry ({"path", "bytes"}) cannot be decoded, or None when it can."""
    source = io.BytesIO(image["bytes"]) if image.get("bytes") else image.get("path")
    if source is None:
        return "no image data"
    if isinstance(source, str) and not Path(source).is_file():
        return f"missing file {source}"
    try:
        with PILImage.open(source) as im:
            im.draft("RGB", (64, 64))  # decode at reduced scale: still reads the whole stream
            im.load()
    except Exception as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------- splitting

def lesion_grouped_split(dx: list[str], lesion_ids: list[str], fraction: float,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out): held_out is about `fraction` of the rows, stratified by dx, and no lesion
    has images on both sides."""
    n_splits = max(2, round(1 / fraction))
    names, counts = np.unique(dx, return_counts=True)
    rare = [f"{name} ({count})" for name, count in zip(names, counts) if count < n_splits]
    if rare:
        warnings.warn(f"too few images of {', '.join(rare)} to put one in each of the {n_splits} folds the "
                      f"held-out split is cut from: it may hold none of them", stacklevel=2)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # said above in the project's words
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        rest, held_out = next(splitter.split(np.zeros(len(dx)), dx, groups=lesion_ids))
    return np.sort(rest), np.sort(held_out)


def check_no_lesion_leak(splits: dict[str, datasets.Dataset]) -> None:
    owner: dict[str, str] = {}
    for name, table in splits.items():
        for lesion in set(table["lesion_id"]):
            if lesion in owner and owner[lesion] != name:
                raise LesionLeakError(f"lesion {lesion} is in both {owner[lesion]} and {name}")
            owner[lesion] = name


def load_lesion_data(cfg: DataConfig, seed: int) -> LesionData:
    """Source -> validated tables -> train/validation/test split by lesion_id (test kept if provided). The split
    (and any subsample) uses `cfg.split_seed`, or `seed` where that is None."""
    seed = seed if cfg.split_seed is None else cfg.split_seed
    tables, source, has_lesion_ids = load_source(cfg)
    # metadata sources are HAM10000, so a label that names none of its classes is a typo
    allowed = set(HAM10000_CLASSES) if has_lesion_ids else None
    tables, dropped = validate(tables, allowed, cfg.skip_bad_images)
    if not has_lesion_ids:
        message = (f"{source} has no lesion ids: splitting by IMAGE. Several images of one lesion may land "
                   "in different splits and inflate the scores; prefer a source with lesion_id.")
        warnings.warn(message, stacklevel=2)
        logger.warning(message)

    pool = tables["train"]
    splits = {}
    name = Path(cfg.data_dir).name if cfg.data_dir else cfg.dataset
    if "test" in tables:
        splits["test"] = tables["test"]
        test_description = f"{name} test split, as provided by the source"
    else:
        test_description = f"{name}, {cfg.test_fraction:.0%} of lesions held out"
        rest, test_idx = lesion_grouped_split(pool["dx"], pool["lesion_id"], cfg.test_fraction, seed)
        splits["test"] = pool.select(test_idx)
        pool = pool.select(rest)
    train_idx, val_idx = lesion_grouped_split(pool["dx"], pool["lesion_id"], cfg.val_fraction, seed)
    splits["train"] = pool.select(train_idx)
    splits["validation"] = pool.select(val_idx)

    label_names = tuple(sorted(set(splits["train"]["dx"]) | set(splits["validation"]["dx"])))
    unseen = sorted(set(splits["test"]["dx"]) - set(label_names))
    if unseen:
        raise BadDataError(f"test labels {unseen} never occur in train/validation of {source}")
    if cfg.max_train_samples:
        splits["train"] = _subsample(splits["train"], cfg.max_train_samples, seed)
    if cfg.max_eval_samples:
        for name in ("validation", "test"):
            splits[name] = _subsample(splits[name], cfg.max_eval_samples, seed)
    splits = {name: splits[name] for name in SPLIT_NAMES}
    check_no_lesion_leak(splits)
    missing = [c for c in label_names if c not in set(splits["train"]["dx"])]
    if missing:
        logger.warning("classes %s have no training images after sub-sampling", missing)
    return LesionData(splits, label_names, source, has_lesion_ids, test_description, dropped)


def _subsample(table: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    """A seeded subset of n rows, stratified by dx where every class can keep a row."""
    if n >= len(table):
        return table
    dx = table["dx"]
    try:
        keep, _ = train_test_split(np.arange(len(table)), train_size=n, stratify=dx, random_state=seed)
    except ValueError:  # too few rows for stratification
        keep, _ = train_test_split(np.arange(len(table)), train_size=n, random_state=seed)
    return table.select(np.sort(keep))


# ---------------------------------------------------------------- transforms and loaders

def lesion_of(file_name: str) -> str:
    """PAD-UFES-20's photos PAT_<patient>_<lesion>_<image> of one lesion share a lesion, so a cross-validation
    keeps them on one side; any other file (a camera's IMG_0001, DSC_0042) is a lesion of its own."""
    stem = Path(file_name).stem
    pad_ufes = re.fullmatch(r"(.*PAT_\d+_\d+)_\d+", stem)
    return pad_ufes.group(1) if pad_ufes else stem


GUARD_MIN_LESIONS = 5    # the guard's photos are cross-validated in this many lesion-grouped folds


def guard_photo_files(folder: str | Path) -> list[Path]:
    """The image files of the guard's photos of skin (config data.guard_photos), sorted; a missing folder, or
    one with too few lesions to cross-validate, is an error before any training starts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadDataError(f"data.guard_photos: {folder} is not a folder. Point --guard-photos at photos of skin "
                           "taken without a dermatoscope (e.g. ../shared/data/clinical-photos), or pass "
                           "--guard-photos '' to fit the out-of-distribution guard on ordinary photos alone")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    lesions = len({lesion_of(f.name) for f in files})
    if lesions < GUARD_MIN_LESIONS:
        raise BadDataError(f"data.guard_photos: {folder} holds {len(files)} images of {lesions} lesion(s); the "
                           f"guard needs photos of at least {GUARD_MIN_LESIONS} lesions")
    return files


def build_transforms(model: torch.nn.Module, cfg: DataConfig, served_framing: bool = True
                     ) -> tuple[T.Compose, T.Compose, dict]:
    """(train, eval, data_config) from timm's data config for `model`, with dermoscopy augmentation. The eval
    crop is `cfg.eval_crop_pct` when `served_framing`; the fit selects its checkpoint with the backbone's own,
    so that the framing can be chosen on validation after training without changing the weights."""
    data_config = resolve_model_data_config(model)
    if cfg.image_size:
        data_config["input_size"] = (3, cfg.image_size, cfg.image_size)
    if served_framing and cfg.eval_crop_pct is not None:
        data_config["crop_pct"] = cfg.eval_crop_pct
    common = dict(input_size=data_config["input_size"], interpolation=data_config["interpolation"],
                  mean=data_config["mean"], std=data_config["std"])
    train_tf = create_transform(**common, is_training=True, scale=(0.35, 1.0), hflip=0.5,
                                vflip=0.5, color_jitter=(0.2, 0.2, 0.15, 0.03))
    # lesions have no canonical orientation; rotate before the crop so the crop trims the corners. The upload
    # shifts act on the source image, so that the crop then enlarges a low-resolution copy as an upload would be
    shifts = [RandomShift(cfg.shift_probability)] if cfg.shift_probability else []
    train_tf = T.Compose([T.RandomRotation(cfg.rotation_degrees), *shifts] + list(train_tf.transforms))
    eval_tf = create_transform(**common, is_training=False, crop_pct=data_config["crop_pct"],
                               crop_mode=data_config.get("crop_mode", "center"))
    return train_tf, eval_tf, data_config


class LabelledImages(torch.utils.data.Dataset):
    """A table's rows as {"pixel_values", "label"} through `transform`. Each image's random draws (torch's and
    Python's generators) are seeded by (seed, epoch, row), so the augmentations of a run are the same whatever
    the number of loader workers, helpers or processes, and a resumed run repeats them."""

    def __init__(self, table: datasets.Dataset, label_names: tuple[str, ...], transform, seed: int = 0,
                 helpers: int | None = None):
        self.rows = table.select_columns(["image", "dx"])
        self.index = {name: i for i, name in enumerate(label_names)}
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.helpers = batch_helpers() if helpers is None else helpers
        self._pool = None

    def set_epoch(self, epoch: int) -> None:
        """Called by `engine.start_epoch` at the start of each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[int(i)]
        seed = int(np.random.SeedSequence([self.seed, self.epoch, int(i)]).generate_state(1)[0])
        python_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):  # the caller's generators are left as they were
                torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's drives dropout
                random.seed(seed)
                pixels = self.transform(row["image"].convert("RGB"))
        finally:
            random.setstate(python_state)
        return {"pixel_values": pixels, "label": self.index[row["dx"]]}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch, for a DataLoader that loads in-process (no workers): the model's compute threads wait for
        it, so the helper processes prepare a share of it on their cores meanwhile. The helpers are forked at
        the first batch and keep this dataset as it was then; only the epoch is passed on."""
        if not self.helpers or len(indices) < 2 or torch.utils.data.get_worker_info() is not None:
            return [self[i] for i in indices]
        if self._pool is None:
            # forked, the helpers share the table and the transform without pickling them; a weak reference,
            # so that the pool does not keep this dataset alive and the finalizer can stop the helpers
            self._pool = ProcessPoolExecutor(self.helpers, multiprocessing.get_context("fork"),
                                             initializer=_start_helper, initargs=(weakref.ref(self), os.getpid()))
            weakref.finalize(self, self._pool.shutdown, cancel_futures=True)
        shares = np.array_split(np.asarray(indices), min(self.helpers + 1, len(indices)))
        try:
            futures = [self._pool.submit(_prepare, share.tolist(), self.epoch) for share in shares[1:]]
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # the compute threads would spin on the helpers' cores between small ops
            try:
                items = [self[i] for i in shares[0]]
            finally:
                torch.set_num_threads(threads)
            helped = [future.result() for future in futures]
        except BrokenProcessPool as exc:  # a helper was killed (out of memory, a signal): go on without them
            logger.warning("a batch helper process stopped (%s); batches are prepared in the training process "
                           "alone from now on", exc)
            self._pool.shutdown(cancel_futures=True)
            self.helpers, self._pool = 0, None
            return [self[i] for i in indices]
        return items + [{"pixel_values": torch.from_numpy(p), "label": y}
                        for pixels, labels in helped for p, y in zip(pixels, labels)]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # loader workers get no helpers of their own


def batch_helpers() -> int:
    """Helper processes for in-process batches: one per compute thread besides this process's own (they idle
    while a batch is prepared), within the cores this process may use, where processes can be forked (Linux)."""
    if sys.platform != "linux":
        return 0
    return max(0, min(torch.get_num_threads(), len(os.sched_getaffinity(0))) - 1)


_helper_images: LabelledImages | None = None
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _start_helper(images: weakref.ref, parent: int) -> None:
    global _helper_images
    # a helper ends with the training process, even a killed one: it would otherwise wait forever on a queue
    # whose other end it holds itself, keeping the parent's stdout open
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent was gone before prctl took effect
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    torch.set_num_threads(1)  # as DataLoader workers do: GNU OpenMP's threads do not survive a fork
    _helper_images = images()


def _prepare(indices: list[int], epoch: int) -> tuple[np.ndarray, list[int]]:
    """A share of a batch as one array: sent through the pipe in one piece, where each tensor of its own would
    cost a shared-memory handover of milliseconds."""
    _helper_images.set_epoch(epoch)
    items = [_helper_images[i] for i in indices]
    return torch.stack([item["pixel_values"] for item in items]).numpy(), [item["label"] for item in items]


def yield_to_compute(_worker_id: int) -> None:
    """A loader worker's `worker_init_fn`: the lowest priority, so that it runs in the gaps the model's compute
    threads leave. On 2 cores, workers of equal priority stall those threads: the fit loop ran at 0.43 of a bare
    loop's speed with 2 such workers and 0.82-0.88 with them niced, which in-process loading beats there."""
    if hasattr(os, "nice"):  # not on Windows
        os.nice(19)


CLASS_WEIGHTING = ("none", "balanced", "sqrt")


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """Loss weights per class: "balanced" is scikit-learn's inverse class frequency, "sqrt" its square root
    (full inverse weights up-weight df 70x relative to nv on HAM10000), "none" all ones. A class without
    training images keeps weight 1: it never occurs in the loss."""
    if mode not in CLASS_WEIGHTING:
        raise ValueError(f"unknown class weighting {mode!r}; choose one of {CLASS_WEIGHTING}")
    weights = np.ones(num_classes)
    if mode != "none":
        present = np.unique(labels)
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return np.sqrt(weights) if mode == "sqrt" else weights


def collate(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([e["pixel_values"] for e in examples]),
            torch.tensor([e["label"] for e in examples], dtype=torch.long))
