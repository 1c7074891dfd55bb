"""Discoverability and trackers: reflab config, plain help, reflab sweep --set, run_id and keys in every Parquet
table, reflab export --tensorboard read back with TensorBoard's event reader."""

from __future__ import annotations

import dataclasses
import glob
import json
import struct
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis import load
from sim.config import ConfigError
from sim.lab.cli import main
from sim.lab.grid import apply_sets, load_grid, plan_sweep
from sim.lab.keys import config_keys, env_keys, field_docs

FAST = ["--set", "train.updates=4", "--set", "train.batch=16"]


def test_every_config_key_is_listed_with_a_doc() -> None:
    rows = {r.key: r for r in config_keys()}
    assert rows["kl.placement"].choices == ("none", "reward", "loss") and rows["kl.placement"].default == "none"
    assert rows["train.lr"].default == 0.01 and "Learning rate" in rows["train.lr"].doc
    assert all(r.doc for r in rows.values()), [k for k, r in rows.items() if not r.doc]
    assert "``" not in "".join(r.doc for r in rows.values())
    from sim.config import KLConfig

    assert set(field_docs(KLConfig)) == {f.name for f in dataclasses.fields(KLConfig)}
    assert {r.key for r in env_keys("bandit")} >= {"env.rewards", "env.ref_probs"}


def test_reflab_config_prints_keys_and_resolved_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "kl.estimator = \"k1\"  (k1 | k2 | k3 | full)" in out and "train.phases = none" in out
    assert main(["config", "quickstart", "--set", "train.lr=0.03"]) == 0
    out = capsys.readouterr().out
    assert "72 runs" in out and "lr: 0.03" in out and "updates: 400" in out  # the phases' sum, as run
    assert main(["config", "--env", "gridworld"]) == 0
    assert "env.layout" in capsys.readouterr().out
    assert main(["config", "--env", "atari"]) == 2
    assert capsys.readouterr().err.startswith("reflab: error: --env must be one of")


def test_help_is_plain_text_and_run_help_lists_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "``" not in top and "config" in top and "export" in top
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "kl.is_correction=false" in out and "train.phases=none" in out and "``" not in out


def test_sweep_set_overrides_the_base_or_makes_an_axis() -> None:
    grid, path = load_grid("example_grid")
    plan = plan_sweep(apply_sets(grid, ["train.lr=0.03", "kl.beta=0.1,0.3,1"], "g"), "g", path.parent)
    assert {r.config.train.lr for r in plan.runs} == {0.03}
    assert {r.config.kl.beta for r in plan.runs} == {0.1, 0.3, 1.0}
    assert "kl.beta" in plan.swept_keys
    with pytest.raises(ConfigError, match="set by the grid's variants"):
        apply_sets(grid, ["kl.placement=loss"], "g")
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_sets(grid, ["train.lrr=1"], "g")


def test_reflab_sweep_accepts_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "example_grid", "--set", "train.updates=3", "--set", "kl.beta=0.2,0.4", "--dry-run"]) == 0
    assert "runs (1 batch signature); dry run" in capsys.readouterr().out


def test_every_table_carries_its_run_id_and_keys(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    assert main(["sweep", "example_grid", "--set", "train.updates=3", "--set", "train.batch=8", "--out", str(out),
                 "--quiet", "--workers", "1"]) == 0
    index = pd.read_parquet(out / "index.parquet")
    metrics = pd.concat([pd.read_parquet(f) for f in glob.glob(str(out / "runs/*/metrics.parquet"))])
    assert {"run_id", "seed", "kl.beta", "kl.placement", "kl.estimator"} <= set(metrics.columns)
    assert set(metrics["run_id"]) == set(index["run_id"])
    by_beta = metrics.groupby("kl.beta")["run_id"].nunique().to_dict()
    assert by_beta == index.groupby("kl.beta")["run_id"].nunique().to_dict()
    one = sorted(glob.glob(str(out / "runs/*/trajectories.parquet")))[0]
    meta = json.loads(pq.read_schema(one).metadata[b"reflab"])
    assert meta["keys"]["run_id"] == Path(one).parent.name and meta["config"]["train"]["updates"] == 3
    run = tmp_path / "run"
    assert main(["run", *FAST, "--out", str(run), "--quiet"]) == 0
    m = pd.read_parquet(run / "metrics.parquet")
    assert m["run_id"].nunique() == 1 and len(m["run_id"].iloc[0]) == 12 and "kl.beta" in m


def test_export_to_tensorboard_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["run", *FAST, "--set", "kl.placement=reward", "--out", str(run), "--quiet"]) == 0
    tb = tmp_path / "tb"
    assert main(["export", str(run), "--tensorboard", str(tb)]) == 0
    (folder,) = list(tb.iterdir())
    ea = EventAccumulator(str(folder))
    ea.Reload()
    kl = ea.Scalars("metrics/kl_true")
    want = pd.read_parquet(run / "metrics.parquet")
    assert [e.step for e in kl] == want["update"].tolist()
    assert [e.value for e in kl] == pytest.approx(want["kl_true"].tolist(), rel=1e-6, abs=1e-9)
    hparams = EventAccumulator(str(folder))  # add_hparams writes a second event file in the same folder
    hparams.Reload()
    assert "_hparams_/experiment" in hparams.PluginTagToContent("hparams")
    content = hparams.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"kl.placement" in content and b"reward" in content
    assert main(["export", str(run), "--tensorboard", str(tb)]) == 0  # again: replaced, not appended
    (again,) = list(tb.iterdir())
    ea = EventAccumulator(str(again))
    ea.Reload()
    assert [e.step for e in ea.Scalars("metrics/kl_true")] == want["update"].tolist()
    assert main(["export", str(tmp_path / "nowhere"), "--tensorboard", str(tb)]) == 2
    assert main(["export", str(run)]) == 2


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file, read independently of wandb: a 7-byte header (``:W&B``, magic, version)
    and LevelDB-log records (4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) in
    32 KiB blocks whose tails shorter than a record header are padding."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            part = chunk
        elif kind == 3:
            part += chunk
        else:
            records.append(part + chunk)
    return records


def test_export_to_wandb_offline_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    run = tmp_path / "run"
    assert main(["run", *FAST, "--set", "kl.placement=reward", "--out", str(run), "--quiet"]) == 0
    out = tmp_path / "wb"
    for _ in range(2):  # the second export replaces the first
        assert main(["export", str(run), "--wandb", str(out)]) == 0
    want = pd.read_parquet(run / "metrics.parquet")
    run_id = want["run_id"].iloc[0]
    (folder,) = list((out / "wandb").glob("offline-run-*"))
    assert f"-{run_id}" in folder.name
    history, config, summary = [], {}, {}
    for raw in _wandb_records(folder / f"run-{run_id}.wandb"):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind in ("run", "config"):  # the config comes with the run record (and any later updates)
            items = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
    assert [h["_step"] for h in history] == want["update"].tolist()
    assert [h["metrics/kl_true"] for h in history] == pytest.approx(want["kl_true"].tolist(), rel=1e-12)
    assert config["kl"]["placement"] == "reward" and config["variant"] == str(load(run).metrics["variant"].iloc[0])
    assert summary["final/kl_true"] == pytest.approx(want["kl_true"].iloc[-1], rel=1e-12)
