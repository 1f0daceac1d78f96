import dataclasses
from typing import Literal

import pytest

from launch.config import ConfigError, exists_field, load_config, save_config, shards_field


@dataclasses.dataclass
class Inner:
    lr: float = 1e-4
    steps: int = 10
    variant: Literal["default", "a"] = "default"
    path: str | None = exists_field(None)


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    shards: str | None = shards_field(None)
    tags: list[str] = dataclasses.field(default_factory=list)


def test_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("inner:\n  lr: 1e-3\n  steps: 5\ntags: [x]\n")
    cfg = load_config(Outer, cfg_file, ["inner.steps=7", "inner.variant=a", "tags=[a, b]"])
    assert cfg.inner.lr == pytest.approx(1e-3)
    assert cfg.inner.steps == 7 and cfg.inner.variant == "a" and cfg.tags == ["a", "b"]
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(Outer, tmp_path / "out" / "config.yaml")
    assert again == cfg


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.step'.*did you mean 'steps'"):
        load_config(Outer, None, ["inner.step=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"inner.steps: expected an integer"):
        load_config(Outer, None, ["inner.steps=abc"])
    with pytest.raises(ConfigError, match=r"inner.variant: 'z' is not one of"):
        load_config(Outer, None, ["inner.variant=z"])


def test_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match=r"inner.path: path does not exist: .*nope"):
        load_config(Outer, None, [f"inner.path={tmp_path}/nope"])
    with pytest.raises(ConfigError, match=r"shards: no shard files match"):
        load_config(Outer, None, [f"shards={tmp_path}/{{00000..00003}}.tar"])
    (tmp_path / "00001.tar").write_bytes(b"")
    cfg = load_config(Outer, None, [f"shards={tmp_path}/{{00000..00003}}.tar"])
    assert cfg.shards.endswith(".tar")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["inner.steps"])
