"""The tensor program: many runs as one batched torch computation.

Random streams (:mod:`~sim.engine.rng`), KL estimators (:mod:`~sim.engine.kl`) and placements
(:mod:`~sim.engine.placement`), PPO pieces (:mod:`~sim.engine.ppo`), policies, optimizers, tabular rollouts
and row tables, the base training loop (:mod:`~sim.engine.loop`) and run outputs. It names no algorithm,
file or command: the trainers in :mod:`sim.algos` assemble it, :mod:`sim.lab` runs them.
"""
