"""The trainers, one per file, each assembled from :mod:`sim.engine` and checking its own config.

- :mod:`~sim.algos.discrete`: the shared base of runs on discrete envs (tabular run state, reference caches,
  exact metrics, policy tables);
- :mod:`~sim.algos.ppo`: PPO with tabular or MLP policies on the discrete envs (sampled and exact modes);
- :mod:`~sim.algos.dpo`: DPO and IPO on preference pairs;
- :mod:`~sim.algos.gaussian`: PPO on the Gaussian bandit;
- :mod:`~sim.algos.diffusion`: PPO on the toy diffusion chain;
- :mod:`~sim.algos.sb3`: ``train.backend: sb3``, runs trained by stable-baselines3 through
  :mod:`~sim.algos.sb3_ppo` (KLRegularizedPPO, usable on any gymnasium env).

Which trainer runs a config is decided in one place, :mod:`sim.lab.dispatch`.
"""
