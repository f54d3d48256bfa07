"""Frozen, strictly validated configuration: one dataclass per section of ``params.yaml``.

Loading is strict: an unknown key, a wrong type or a value out of range fails with a
``ConfigError`` that names the file, the dotted key, the value and what was expected. The
same file is read by DVC (``params:`` in dvc.yaml) and by the click commands.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "ScoreConfig",
    "RetrainConfig",
    "PathsConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
]


class ConfigError(ValueError):
    """A params file or override is invalid; the message names file, key, value and expectation."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | cifar10 | cifar100 | imagefolder | synthetic
    root: str = ""  # data folder (cifar*, imagefolder); "" = ~/.cache/tddyun/<name>
    download: bool = False  # torchvision download for cifar10/100
    subset: int | None = None  # seeded, class-balanced subset of K training samples
    # K samples held out of the training set (after subset), seeded and class-balanced, as the
    # evaluation split in place of the test set: tune on it, so the test set is touched once
    validation: int | None = None
    seed: int = 0  # seed of the subset and of the digits train/test split
    test_fraction: float = 0.25  # digits only: fraction held out as the test split
    augment: bool = True  # random crop (pad 4 px) + horizontal flip, images only
    # synthetic only: a tiny Gaussian-blob classification problem for tests
    synthetic_samples: int = 256
    synthetic_classes: int = 4
    synthetic_features: int = 16
    synthetic_test_samples: int = 128


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"  # mlp | small_cnn | resnet18_cifar | torchvision:<name>
    width: int = 16  # small_cnn: channels of the first block; mlp: hidden units = 8 * width


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # peak learning rate (per-iteration cosine from it to 0)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0  # linear warm-up, in epochs (fractions allowed)
    seed: int = 0
    test_every: int = 1  # epochs between test-set passes; 0 = the last epoch only (sweeps)
    record: Literal["train", "eval", "none"] = "train"  # which logits go to the store
    record_loss: bool = False  # also store the per-sample loss, (E, N)
    logits_dtype: Literal["float32", "float16"] = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:K
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass(frozen=True)
class ScoreConfig:
    # score name -> its parameters; a parameter left out takes the docs/scores.md default
    methods: dict = field(default_factory=lambda: {"td_dyun": {}})
    select_by: str = "td_dyun"
    prune_rate: float | None = None  # fraction removed, in [0, 1)
    keep_fraction: float | None = None  # alias: 1 - prune_rate; never both
    selection: Literal["top", "stratified"] = "top"
    class_balanced: bool = True
    hard_prune: float = 0.0  # stratified: fraction of highest scores dropped first
    bins: int = 50  # stratified: equal-width score bins
    seed: int = 0  # stratified draws and the `random` score
    weighting: Literal["auto", "none", "score", "inverse_inclusion"] = "auto"
    weight_gamma: float = 1.0
    weight_min: float = 0.25
    weight_max: float = 4.0
    class_balance: bool = False  # restore the full data's class proportions in the weights
    device: str = "cpu"  # where the score functions run: cpu | cuda
    kernel: Literal["auto", "eager", "native"] = "auto"  # native: one-pass C kernel (CPU), compiled on first use
    block_mb: float = 128.0  # memory of one block of samples (all epochs), in MiB, per worker thread


@dataclass(frozen=True)
class RetrainConfig:
    budget: Literal["same_epochs", "same_steps"] = "same_epochs"
    seed: int = 0
    random_baseline: bool = True  # `tddyun run` also retrains on a random keep-list


@dataclass(frozen=True)
class PathsConfig:
    store: str = "artifacts/logits.zarr"
    train_metrics: str = "artifacts/train_metrics.json"
    train_history: str = "artifacts/train_history.csv"  # per-epoch, for dvc plots
    train_model: str = "artifacts/train_model.pt"
    checkpoint: str = "artifacts/train_checkpoint.pt"
    scores: str = "artifacts/scores.zarr"
    keep: str = "artifacts/keep.csv"
    score_summary: str = "artifacts/score_summary.json"
    retrain_metrics: str = "artifacts/retrain_metrics.json"
    retrain_history: str = "artifacts/retrain_history.csv"
    retrain_model: str = "artifacts/retrain_model.pt"
    report: str = "artifacts/report"
    sweep: str = "artifacts/sweep"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    source: str = field(default="<defaults>", compare=False)  # the file it came from

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "source"}


# ---------------------------------------------------------------------------------------------
# Strict conversion
# ---------------------------------------------------------------------------------------------
def _coerce(value: Any, annotation: Any, *, where: str, source: str) -> Any:
    """Check ``value`` against a type annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where=where, source=source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{source}: {where} = {value!r}: expected {_describe(annotation)}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(
                f"{source}: {where} = {value!r}: expected one of {', '.join(map(repr, allowed))}"
            )
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} = {value!r}: expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where} = {value!r}: expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {where} = {value!r}: expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where} = {value!r}: expected a string")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {where} = {value!r}: expected a mapping")
        return {str(k): (dict(v) if isinstance(v, Mapping) else v) for k, v in value.items()}
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")  # programming error


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _section_from_dict(cls: type, raw: Any, *, section: str, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {section} = {raw!r}: expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {section}.{unknown[0]} (value {raw[unknown[0]]!r}); "
            f"valid keys of {section}: {', '.join(sorted(known))}"
        )
    kwargs = {
        key: _coerce(value, hints[key], where=f"{section}.{key}", source=source)
        for key, value in raw.items()
    }
    return cls(**kwargs)


def config_from_dict(raw: Mapping[str, Any] | None, *, source: str = "<dict>") -> Config:
    """Build and validate a Config from a nested mapping (a parsed params file)."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section {unknown[0]!r}; valid sections: {', '.join(_SECTIONS)}"
        )
    hints = typing.get_type_hints(Config)
    sections = {
        name: _section_from_dict(hints[name], raw.get(name), section=name, source=source)
        for name in _SECTIONS
    }
    config = Config(**sections, source=source)
    validate(config)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON-able data (what every output records)."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in _SECTIONS}


def _parse_override(text: str, *, source: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"{source}: override {text!r}: expected key.sub=value")
    key, _, value_text = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{source}: override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: override {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (YAML-parsed values) to a raw params mapping."""
    raw = _deep_copy(raw)
    for text in overrides:
        parts, value = _parse_override(text, source="--set")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {part} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return raw


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def read_params(path: str | Path) -> dict[str, Any]:
    """Parse a params file into a raw mapping, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, found {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (or the defaults when None), apply ``--set`` overrides, validate."""
    raw = read_params(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " with --set " + " ".join(overrides)
    return config_from_dict(raw, source=source)


# ---------------------------------------------------------------------------------------------
# Ranges that a type alone cannot express
# ---------------------------------------------------------------------------------------------
def _check(ok: bool, source: str, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key} = {value!r}: expected {expected}")


def validate(config: Config) -> None:
    s = config.source
    d, m, t, sc = config.data, config.model, config.train, config.score
    _check(d.subset is None or d.subset > 0, s, "data.subset", d.subset, "a positive integer or null")
    _check(d.validation is None or d.validation > 0, s, "data.validation", d.validation,
           "a positive integer or null")
    _check(d.validation is None or d.subset is None or d.validation < d.subset, s, "data.validation",
           d.validation, f"fewer than data.subset = {d.subset} samples")
    _check(0.0 < d.test_fraction < 1.0, s, "data.test_fraction", d.test_fraction, "a number in (0, 1)")
    for key in ("synthetic_samples", "synthetic_classes", "synthetic_features", "synthetic_test_samples"):
        value = getattr(d, key)
        _check(value >= 1, s, f"data.{key}", value, "an integer >= 1")
    _check(d.synthetic_classes >= 2, s, "data.synthetic_classes", d.synthetic_classes, "an integer >= 2")
    _check(m.width >= 1, s, "model.width", m.width, "an integer >= 1")
    _check(t.epochs >= 1, s, "train.epochs", t.epochs, "an integer >= 1")
    _check(t.batch_size >= 1, s, "train.batch_size", t.batch_size, "an integer >= 1")
    _check(t.lr > 0, s, "train.lr", t.lr, "a number > 0")
    _check(0 <= t.momentum < 1, s, "train.momentum", t.momentum, "a number in [0, 1)")
    _check(t.weight_decay >= 0, s, "train.weight_decay", t.weight_decay, "a number >= 0")
    _check(0 <= t.label_smoothing < 1, s, "train.label_smoothing", t.label_smoothing, "a number in [0, 1)")
    _check(0 <= t.warmup_epochs <= t.epochs, s, "train.warmup_epochs", t.warmup_epochs,
           f"a number in [0, train.epochs = {t.epochs}]")
    _check(t.test_every >= 0, s, "train.test_every", t.test_every, "an integer >= 0")
    _check(t.num_threads >= 0, s, "train.num_threads", t.num_threads, "an integer >= 0")
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), s,
           "train.device", t.device, "auto, cpu, cuda or cuda:K")
    _check(sc.device == "cpu" or sc.device.startswith("cuda"), s, "score.device", sc.device,
           "cpu, cuda or cuda:K")
    _check(sc.prune_rate is None or sc.keep_fraction is None, s, "score.keep_fraction",
           sc.keep_fraction, f"null when score.prune_rate is given (prune_rate = {sc.prune_rate})")
    _check(sc.prune_rate is None or 0.0 <= sc.prune_rate < 1.0, s, "score.prune_rate",
           sc.prune_rate, "a number in [0, 1)")
    _check(sc.keep_fraction is None or 0.0 < sc.keep_fraction <= 1.0, s, "score.keep_fraction",
           sc.keep_fraction, "a number in (0, 1]")
    _check(0.0 <= sc.hard_prune < 1.0, s, "score.hard_prune", sc.hard_prune, "a number in [0, 1)")
    _check(sc.bins >= 1, s, "score.bins", sc.bins, "an integer >= 1")
    _check(sc.weight_gamma > 0, s, "score.weight_gamma", sc.weight_gamma, "a number > 0")
    _check(0 < sc.weight_min <= 1.0 <= sc.weight_max, s, "score.weight_min/weight_max",
           (sc.weight_min, sc.weight_max), "0 < weight_min <= 1 <= weight_max")
    _check(sc.block_mb > 0, s, "score.block_mb", sc.block_mb, "a number of MiB > 0")
    _check(bool(sc.methods), s, "score.methods", sc.methods, "at least one score")
    for name, params in sc.methods.items():
        _check(params is None or isinstance(params, dict), s, f"score.methods.{name}", params,
               "a mapping of parameters (or {})")
    _check(sc.select_by in sc.methods, s, "score.select_by", sc.select_by,
           f"one of the names in score.methods ({', '.join(sc.methods)})")


def prune_rate_of(score: ScoreConfig) -> float:
    """The pruning rate p in [0, 1) from either ``prune_rate`` or ``keep_fraction`` (default 0.5)."""
    if score.prune_rate is not None:
        return score.prune_rate
    if score.keep_fraction is not None:
        return 1.0 - score.keep_fraction
    return 0.5
