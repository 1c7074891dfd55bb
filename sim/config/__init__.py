"""Run configuration: one frozen, documented dataclass tree (:mod:`~sim.config.schema`), read from YAML and
``--set key=value`` overrides and validated (:mod:`~sim.config.parse`), with keys that would change nothing
refused (:mod:`~sim.config.effects`).

Every key is dotted (``kl.beta``, ``train.lr``); values given on the command line are YAML-parsed. Unknown keys
and invalid values raise :class:`ConfigError` with one line naming the key and the valid choices. What a trainer
does not support is checked by that trainer (``check_config`` of each class in :mod:`sim.algos`, applied by
:func:`sim.lab.dispatch.check_config`).
"""

from sim.config.effects import check_effects, effective_dict
from sim.config.parse import (
    check_positive,
    deep_merge,
    from_dict,
    load_yaml,
    merge_env,
    parse_override,
    read_yaml_file,
    resolve,
    set_key,
    yaml_load,
)
from sim.config.schema import *  # noqa: F403  the schema's names, re-exported
from sim.config.schema import __all__ as _schema_names

__all__ = ["check_effects", "check_positive", "deep_merge", "effective_dict", "from_dict", "load_yaml", "merge_env",
           "parse_override", "read_yaml_file", "resolve", "set_key", "yaml_load", *_schema_names]
