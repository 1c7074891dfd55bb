"""reflab's simulator, in three layers whose imports point down: :mod:`sim.lab` (orchestration: dispatch,
sweeps, run folders, the CLI) → :mod:`sim.algos` (one trainer per file) → :mod:`sim.engine` (the batched tensor
program), all configured by :mod:`sim.config` and training the environments of :mod:`envs`.
"""
