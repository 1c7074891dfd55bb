"""Orchestration: which trainer runs a config (:mod:`~sim.lab.dispatch`), run folders (:mod:`~sim.lab.runs`),
grids (:mod:`~sim.lab.grid`), sweeps (:mod:`~sim.lab.sweep`) and where their tasks run
(:mod:`~sim.lab.executors`), progress, the benchmark (:mod:`~sim.lab.bench`) and the command line
(:mod:`~sim.lab.cli`).
"""
