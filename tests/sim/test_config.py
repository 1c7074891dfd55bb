"""sim.config: keys without effect are refused (one line), phases record the updates they run, and run ids
stay those of the folders already on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.config import ConfigError, effective_dict, resolve
from sim.lab.cli import main
from sim.lab.grid import plan_sweep
from sim.lab.run_ids import run_id

PHASES = "train.phases=[{updates: 3, reward_scale: 1}, {updates: 4, reward_scale: 0}]"


@pytest.mark.parametrize("overrides,key", [
    (["kl.placement=reward", "kl.is_correction=true"], "kl.is_correction"),
    (["kl.placement=none", "kl.is_correction=true"], "kl.is_correction"),
    (["kl.placement=loss", "kl.estimator=full", "kl.is_correction=true"], "kl.is_correction"),
    (["kl.placement=none", "kl.estimator=k3"], "kl.estimator"),
    (["kl.placement=none", "kl.controller=adaptive"], "kl.controller"),
    (["kl.placement=reward", "kl.target=0.5"], "kl.target"),
    (["kl.placement=reward", "kl.horizon=50"], "kl.horizon"),
    (["reference.every=5"], "reference.every"),
    (["reference.schedule=reset", "reference.alpha=0.3"], "reference.alpha"),
    (["train.hidden=8"], "train.hidden"),
    (["kl.placement=none", "kl.clamp=2"], "kl.clamp"),
    (["train.mode=exact", "train.epochs=2"], "train.epochs"),
    (["dpo.pairs=64"], "dpo.pairs"),
    (["train.algo=dpo", "kl.placement=loss"], "kl.placement"),
    ([PHASES, "train.updates=5"], "train.updates"),
])
def test_a_key_without_effect_is_refused_naming_it(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}=.* has no effect") as err:
        resolve(None, overrides, effects="strict")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["kl.placement=loss", "kl.estimator=k2", "kl.is_correction=true"],
    ["kl.placement=reward", "kl.controller=adaptive", "kl.target=0.5", "kl.horizon=50"],
    ["reference.schedule=ema", "reference.every=5", "reference.alpha=0.3"],
    ["train.policy=mlp", "train.hidden=8"],
    ["kl.placement=loss", "kl.clamp=2"],
    ["train.algo=dpo", "dpo.pairs=64"],
    [PHASES, "train.updates=7"],
])
def test_the_same_keys_where_they_act_are_accepted(overrides: list[str]) -> None:
    resolve(None, overrides, effects="strict")


def test_keys_a_grid_base_shares_are_accepted_outside_reflab_run() -> None:
    """Configs built in code are batched like a grid's runs: keys a shared base sets pass (``effects="grid"``,
    the default of resolve), the others do not."""
    resolve(None, ["kl.placement=none", "kl.clamp=2"])
    with pytest.raises(ConfigError, match="kl.is_correction"):
        resolve(None, ["kl.placement=reward", "kl.is_correction=true"])


def test_reflab_run_refuses_is_correction_in_the_reward(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    code = main(["run", "--set", "kl.placement=reward", "--set", "kl.is_correction=true", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("reflab: error: kl.is_correction=true has no effect") and "\n" not in err
    assert not out.exists()


def test_phases_record_the_updates_they_run(tmp_path: Path) -> None:
    cfg = resolve(None, [PHASES])
    assert cfg.train.updates == 7 == cfg.train.total_updates
    assert resolve(None, [PHASES, "train.updates=7"]) == cfg
    out = tmp_path / "run"
    assert main(["run", "--set", PHASES, "--set", "train.batch=8", "--out", str(out), "--quiet"]) == 0
    recorded = json.loads((out / "config.json").read_text())["config"]["train"]
    assert recorded["updates"] == 7
    # the recorded config resolves to the same config, hence the same id
    assert run_id(resolve(None, [f"train.phases={json.dumps(recorded['phases'])}", "train.updates=7"])) == run_id(cfg)


def test_run_ids_ignore_the_recorded_sum_of_phases() -> None:
    """The id hashes ``train.updates`` at its default when phases are given (what it was before the sum was
    recorded), and leaves out keys added since ids were defined while they hold their defaults
    (``sim.lab.run_ids``)."""
    import hashlib

    from sim.lab.run_ids import identity_json

    plain = resolve(None, ["train.updates=50"])
    assert run_id(plain) == hashlib.sha256(identity_json(plain).encode()).hexdigest()[:12]
    assert "staleness" not in json.loads(identity_json(plain))["train"]
    phased = resolve(None, [PHASES])
    assert phased.train.updates != 300 and json.loads(identity_json(phased))["train"]["updates"] == 300


def test_effective_dict_resets_only_keys_without_effect() -> None:
    a = resolve(None, ["kl.placement=loss", "kl.estimator=k3", "kl.clamp=2", "train.hidden=64"])
    d = effective_dict(a)
    assert d["kl"]["clamp"] == 2 and d["kl"]["estimator"] == "k3"
    none = resolve(None, ["kl.placement=none", "train.lr=0.03"])
    assert effective_dict(none)["train"]["lr"] == 0.03


def test_a_grid_base_may_share_keys_but_runs_differing_only_in_them_are_refused() -> None:
    shared = {"base": {"kl": {"clamp": 2.0}, "train": {"updates": 5}},
              "variants": [{"kl.placement": "none"}, {"kl.placement": "loss", "kl.estimator": "k3"}], "seeds": 1}
    assert len(plan_sweep(shared, "g").runs) == 2  # the clamp acts on the loss run, and is shared by the base
    dup = {"base": {"kl": {"placement": "none"}}, "axes": {"kl.clamp": [None, 1.5]}, "seeds": 1}
    with pytest.raises(ConfigError, match="differ only in kl.clamp, which has no effect"):
        plan_sweep(dup, "g")
    dpo_for_ppo = {"base": {}, "axes": {"dpo.pairs": [64, 128]}, "seeds": 1}
    with pytest.raises(ConfigError, match="differ only in dpo.pairs"):
        plan_sweep(dpo_for_ppo, "g")
    refused = {"base": {}, "variants": [{"kl.placement": "reward", "kl.is_correction": True}], "seeds": 1}
    with pytest.raises(ConfigError, match="kl.is_correction=true has no effect"):
        plan_sweep(refused, "g")


def test_plain_dict_is_asdict_made_plain() -> None:
    """The one-pass :func:`plain_dict` gives what ``dataclasses.asdict`` then :func:`to_plain` give, with fresh
    containers and scalar subclasses kept."""
    import dataclasses

    from sim.config import Config, Phase, TrainConfig, plain_dict, to_plain

    class Name(str):
        pass

    cfg = Config(env={"id": "bandit", "means": [0.5, 1, (2, [3.0])], "tag": Name("a")},
                 train=TrainConfig(phases=(Phase(3, 0.0),), init=(0.25, 0.75)))
    d = plain_dict(cfg)
    assert d == to_plain(dataclasses.asdict(cfg))
    assert json.dumps(d, sort_keys=True) == json.dumps(to_plain(dataclasses.asdict(cfg)), sort_keys=True)
    assert type(d["env"]["tag"]) is Name and d["train"]["init"] == [0.25, 0.75]
    assert d["env"]["means"] is not cfg.env["means"]


def test_a_checked_env_is_each_configs_own() -> None:
    """Env mappings checked once are reused, as fresh copies, and a tuple is told from a list and 1 from 1.0."""
    data = {"env": {"id": "bandit", "n_arms": 2, "rewards": [0.1, 0.9]}}
    a, b = resolve(base=data), resolve(base=data)
    assert a.env == b.env and a.env is not b.env and a.env["rewards"] is not b.env["rewards"]
    a.env["rewards"].append(5.0)
    assert resolve(base=data).env == b.env
    assert resolve(base={"env": {"id": "bandit", "n_arms": 2, "rewards": (0.1, 0.9)}}).env == b.env
    assert resolve(base={"env": {"id": "bandit", "n_arms": 2, "rewards": [0, 1]}}).env["rewards"] == [0.0, 1.0]
    with pytest.raises(ConfigError, match="env.rewards"):
        resolve(base={"env": {"id": "bandit", "n_arms": 3, "rewards": [0.1, 0.9]}})
