"""Typed, frozen settings for data, models and training; saved with every run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

DEFAULT_BACKBONES = ("resnet18", "efficientnet_b0", "convnextv2_nano")
DEFAULT_HUB_DATASET = "marmal88/skin_cancer"


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = None          # local folder: imagefolder+metadata.csv, raw HAM10000, or class folders
    dataset: str | None = None           # Hub dataset id (or a local copy of such a repo)
    val_fraction: float = 0.15           # of train lesions, for checkpoint/threshold selection
    split_seed: int | None = None        # seed of the lesion split; None: the training seed. Fix it to compare
                                         # training seeds on one validation split
    test_fraction: float = 0.15          # only used when the source has no test split of its own
    skip_bad_images: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    image_size: int | None = None        # None: the backbone's own input size
    eval_crop_pct: float | None = None   # share of the resized image the evaluation crop keeps (timm crop_pct);
                                         # None: the backbone's own. 1.0 keeps the lesion's borders in the frame
    num_workers: int = 2
    rotation_degrees: float = 180.0      # dermoscopy has no canonical "up"
    shift_probability: float = 0.0       # chance of each upload shift in training (shift.RandomShift): lower
                                         # resolution, aspect, colour cast, blur, JPEG
    guard_photos: str | None = None      # folder of photos of skin taken without a dermatoscope: the
                                         # out-of-distribution guard learns to flag them (None: ordinary photos only)

    def __post_init__(self):
        crop = self.eval_crop_pct
        if crop is not None and (isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1):
            raise ValueError(f"data.eval_crop_pct is {crop!r}: it is the share of the resized image the evaluation "
                             "crop keeps, a number above 0 and at most 1")


@dataclass(frozen=True)
class ModelConfig:
    pretrained: bool = True              # ImageNet weights through timm (the Hub)
    pretrained_files: dict[str, str] = field(default_factory=dict)  # local ImageNet weights per backbone
    drop_rate: float = 0.2

    def init_description(self, backbone: str) -> str:
        """How `backbone` starts: what every results table must say."""
        if backbone in self.pretrained_files:
            return f"ImageNet (file {self.pretrained_files[backbone].rsplit('/', 1)[-1]})"
        return "ImageNet (timm, Hub)" if self.pretrained else "random (from scratch)"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    warmup_epochs: int = 1
    min_lr: float = 1e-6
    label_smoothing: float = 0.0
    class_weighting: str = "none"        # "none", "balanced" (inverse class frequency) or "sqrt" (its root)
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"          # "no", "fp16", "bf16"
    max_steps: int | None = None         # cap on optimizer steps per backbone (small runs)
    seed: int = 42
    explain_images: int = 16             # validation images for the ROAD faithfulness of each CAM method
    bootstrap_resamples: int = 1000      # lesion resamples for the test metrics' confidence intervals


@dataclass(frozen=True)
class RunConfig:
    backbones: tuple[str, ...] = DEFAULT_BACKBONES
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """Build from a nested dict (a YAML file or a saved config.json); unknown keys raise."""
        sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
        kwargs = {}
        for key, value in values.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value or {}, where=key)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = tuple(value) if key == "backbones" else value
            else:
                raise ValueError(f"unknown config key {key!r}; expected one of "
                                 f"{sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**kwargs)


def _build(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config section {where!r}; expected {sorted(known)}")
    return cls(**values)


def replace_nested(config: RunConfig, **sections: dict) -> RunConfig:
    """Override fields section by section: replace_nested(cfg, train={"epochs": 2})."""
    changes = {}
    for name, values in sections.items():
        if name in ("data", "model", "train"):
            current = getattr(config, name)
            _build(type(current), values, where=name)  # reject unknown keys
            changes[name] = dataclasses.replace(current, **values)
        else:
            changes[name] = values
    return dataclasses.replace(config, **changes)


def section_fields() -> dict[str, str]:
    """Every settings field name -> its section ("data", "model", "train"): what a flag of that name sets."""
    return {f.name: section for section, cls in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig))
            for f in dataclasses.fields(cls)}
