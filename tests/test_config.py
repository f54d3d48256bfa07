"""Strict params loading: unknown keys, wrong types, ranges and overrides name file, key and value."""
from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_to_dict, load_config, prune_rate_of


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_defaults_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, "train: {epochs: 3, lr: 1}\n"))
    assert cfg.train.epochs == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # an int is accepted for a float
    assert config_to_dict(cfg)["train"]["epochs"] == 3


@pytest.mark.parametrize("text, fragments", [
    ("train: {epochz: 3}\n", ["params.yaml", "train.epochz", "3", "valid keys"]),
    ("train: {epochs: three}\n", ["train.epochs", "'three'", "integer"]),
    ("train: {epochs: 2.5}\n", ["train.epochs", "2.5", "integer"]),
    ("train: {nesterov: 1}\n", ["train.nesterov", "true or false"]),
    ("train: {record: both}\n", ["train.record", "'both'", "'train'", "'eval'"]),
    ("trainer: {}\n", ["unknown section", "trainer"]),
    ("train: {epochs: 0}\n", ["train.epochs", "0", ">= 1"]),
    ("score: {prune_rate: 1.0}\n", ["score.prune_rate", "1.0", "[0, 1)"]),
    ("score: {prune_rate: 0.5, keep_fraction: 0.5}\n", ["score.keep_fraction", "prune_rate"]),
    ("score: {methods: {dyun: {}}, select_by: tdds}\n", ["score.select_by", "tdds", "dyun"]),
    ("- a list\n", ["expected a mapping"]),
])
def test_bad_params_name_file_key_value(tmp_path, text, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path, "score: {methods: {td_dyun: {}}}\n")
    cfg = load_config(path, ["score.prune_rate=0.7", "score.methods.td_dyun.alpha=0.3", "data.subset=null"])
    assert cfg.score.prune_rate == 0.7
    assert cfg.score.methods["td_dyun"] == {"alpha": 0.3}
    assert cfg.data.subset is None
    assert prune_rate_of(cfg.score) == 0.7


def test_keep_fraction_is_an_alias():
    cfg = load_config(None, ["score.keep_fraction=0.25"])
    assert prune_rate_of(cfg.score) == pytest.approx(0.75)


def test_override_errors_name_the_override(tmp_path):
    with pytest.raises(ConfigError, match="--set train.epochs=x"):
        load_config(None, ["train.epochs=x"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["epochs=3"])


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "configs").glob("*.yaml")) + [root / "params.yaml"]
    assert len(files) >= 5
    for path in files:
        load_config(path)


def test_shipped_configs_and_tuning_variants_load():
    """Every params file in configs/ loads; every bench/tune.py variant is a valid override set
    whose TD-DyUn parameters resolve at each tuned rate (a typo there would waste an hour)."""
    import importlib.util

    from pipeline.scores import resolve_methods

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.yaml")):
        load_config(path)
    tune_cfg = load_config(root / "configs" / "cifar10-cpu-tune.yaml")
    assert tune_cfg.data.validation and tune_cfg.paths.store != load_config(
        root / "configs" / "cifar10-cpu.yaml").paths.store  # tuning never shares the benchmark's store
    spec = importlib.util.spec_from_file_location("tune", root / "bench" / "tune.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    seen = set()
    for name, (_, overrides) in tune.VARIANTS.items():
        cfg = load_config(root / "configs" / "cifar10-cpu-tune.yaml", overrides)
        resolved = [resolve_methods({"td_dyun": cfg.score.methods.get("td_dyun") or {}}, epochs=20, prune_rate=p)
                    for p in (0.3, 0.7, 0.9)]
        key = (repr(resolved), cfg.score.weighting, cfg.score.class_balanced, cfg.score.class_balance)
        assert key not in seen, f"variant {name} changes nothing"
        seen.add(key)
