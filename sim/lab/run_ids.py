"""Run ids: the first 12 hex digits of the SHA-256 of a run's resolved config, stable as reflab grows.

A sweep resumes into ``runs/<run_id>/``, so an id must not change when reflab gains a config key: the JSON an id
hashes leaves out every key added after ids were first defined while it holds its default (:data:`ID_KEYS`,
:data:`ID_ENV_KEYS`). A run that sets a new key gets a new id. With ``train.phases``, ``train.updates`` (recorded
as the phases' sum) is hashed at its default, as it was before the sum was recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

from sim.config import Config, to_plain

ID_KEYS = frozenset((
    "device", "dpo.batch_size", "dpo.beta", "dpo.bt_temperature", "dpo.data_seed", "dpo.epochs", "dpo.loss",
    "dpo.pairs", "dpo.sampler", "kl.beta", "kl.clamp", "kl.controller", "kl.estimator", "kl.horizon",
    "kl.is_correction", "kl.placement", "kl.target", "log.every", "log.policy_every", "log.progress",
    "log.trajectories", "reference.alpha", "reference.every", "reference.schedule", "seed", "threads", "train.algo",
    "train.backend", "train.baseline", "train.batch", "train.clip", "train.dtype", "train.ent_coef", "train.epochs",
    "train.gae_lambda", "train.gamma", "train.hidden", "train.init", "train.lr", "train.max_grad_norm",
    "train.minibatches", "train.mode", "train.norm_adv", "train.optimizer", "train.phases", "train.policy",
    "train.updates", "train.vf_coef"))
"""The config keys run ids were first defined with: a key added later enters a run's id only when it differs from
its default (:func:`identity_json`). Never edit this set."""
ID_SECTIONS = frozenset(("dpo", "kl", "log", "reference", "train"))
ID_ENV_KEYS: dict[str, tuple[str, ...]] = {
    "bandit": ("n_arms", "ref_preference", "ref_probs", "ref_temperature", "reward_noise", "reward_seed", "rewards"),
    "gaussian_bandit": ("dim", "fixed_std", "mode_std", "mode_weights", "modes", "ref_mean", "ref_std", "reward",
                        "reward_coef", "reward_noise", "target"),
    "diffusion_chain": ("dim", "mode_std", "mode_weights", "modes", "noise_end", "noise_start", "reward",
                        "reward_center", "reward_coef", "reward_noise", "reward_width", "step_variance", "steps"),
    "gridworld": ("goal_rewards", "horizon", "lava_reward", "layout", "obs", "ref_goal", "ref_temperature", "slip",
                  "step_reward"),
    "token_tree": ("length", "ref_logits", "ref_logits_seed", "ref_temperature", "reward", "reward_seed",
                   "reward_table", "target", "vocab"),
}
"""The env keys of each env when run ids were first defined (see :data:`ID_KEYS`). Never edit this mapping."""


def identity_json(cfg: Config) -> str:
    """The JSON a run's id hashes: :meth:`~sim.config.Config.to_json` without the keys added after run ids were first
    defined (:data:`ID_KEYS`) while they hold their default, so an existing sweep folder keeps its ids (and
    resumes) when reflab gains a key, and a run that sets the new key gets a new id."""
    d = cfg.to_dict()
    defaults = Config().to_dict()
    if cfg.train.phases is not None:  # ids were defined when the phases' sum was not yet recorded here
        d["train"]["updates"] = defaults["train"]["updates"]
    for section in list(d):
        if section == "env":
            env_id = d["env"]["id"]
            known = ID_ENV_KEYS.get(env_id, ())
            env_defaults = _env_defaults(env_id)
            for key in list(d["env"]):
                if key != "id" and key not in known and to_plain(env_defaults.get(key)) == d["env"][key]:
                    del d["env"][key]
        elif isinstance(d[section], dict):
            for key in list(d[section]):
                if f"{section}.{key}" not in ID_KEYS and d[section][key] == defaults[section][key]:
                    del d[section][key]
            if not d[section] and section not in ID_SECTIONS:
                del d[section]
        elif section not in ID_KEYS and d[section] == defaults[section]:
            del d[section]
    return json.dumps(d, sort_keys=True)


@functools.cache
def _env_defaults(env_id: str) -> dict:
    """The default params of ``env_id`` as a dict (read only; imports the env's module)."""
    import envs

    return dataclasses.asdict(envs.spec(env_id).params())


def run_id(cfg: Config) -> str:
    """The run's id: the first 12 hex digits of the SHA-256 of :func:`identity_json`."""
    return hashlib.sha256(identity_json(cfg).encode()).hexdigest()[:12]
