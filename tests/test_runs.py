import json

import pytest
import torch

from femeta._io import write_atomic
from femeta.runs import RunError, load_run, save_run


def test_round_trip(tmp_path):
    state = {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3)}
    save_run(tmp_path / "run", state, {"problem": "poisson1d"}, [{"epoch": 1}])
    config, loaded = load_run(tmp_path / "run", "poisson1d")
    assert config["problem"] == "poisson1d" and "femeta_version" in config
    assert torch.equal(loaded["w"], state["w"])


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "file.json"
    target.write_text("old")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr("femeta._io.os.fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_other_version_is_refused(tmp_path):
    save_run(tmp_path, {"w": torch.zeros(1)}, {"problem": "poisson1d"}, [])
    config = json.loads((tmp_path / "config.json").read_text())
    config["femeta_version"] = "9.0.0"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match=r"femeta 9\.0\.0"):
        load_run(tmp_path, "poisson1d")


def test_incomplete_directory_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(RunError, match=r"config\.json is missing"):
        load_run(tmp_path, "poisson1d")
