"""``reflab config``: every config key with its default, valid values and one-line doc, and the resolved config
of a preset, a grid or a run config file.

The docs come from the code: the attribute docstrings of the dataclasses in :mod:`sim.config` (read from their
source with :mod:`ast`) and the ``Attributes:`` sections of the env params classes in :mod:`envs`, so the list
never drifts from what the config accepts.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import textwrap
from dataclasses import dataclass
from typing import Any

import yaml

import envs
from sim import config as C
from sim.config import ConfigError, UsageError


@dataclass(frozen=True)
class KeyDoc:
    """One config key: its dotted name, default, valid values (empty: any of its type) and one-line doc."""

    key: str
    default: Any
    choices: tuple[str, ...]
    doc: str


def plain(text: str) -> str:
    """Docstring markup as plain text: ````x```` → ``x``, ``:func:`a.b``` → ``a.b``, whitespace folded."""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)
    text = text.replace("``", "")
    return " ".join(text.split())


def _first_sentence(text: str) -> str:
    text = plain(text)
    m = re.match(r"(.+?\.)(\s|$)", text)
    return m.group(1) if m and len(m.group(1)) < len(text) and len(m.group(1)) > 40 else text


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass whose fields are followed by a string literal (attribute docs)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out = {}
    for a, b in zip(body, body[1:], strict=False):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            out[a.target.id] = b.value.value
    return out


def attribute_docs(cls: type) -> dict[str, str]:
    """``{attribute: doc}`` from the ``Attributes:`` section of a Google-style class docstring."""
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
    section = doc.split("Attributes:", 1)[1]
    out: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        m = re.match(r"^\s{4}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2)
        elif current and line.startswith("        "):
            out[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return out


def config_keys() -> list[KeyDoc]:
    """Every key of the run config except ``env.*`` (see :func:`env_keys`), in the order of :mod:`sim.config`."""
    defaults = C.default_dict()
    out = [KeyDoc("env.id", "bandit", tuple(envs.REGISTRY), "Environment; each env has its own env.* keys "
                  "(reflab config --env ID).")]
    sections = C.SECTIONS
    for name, cls in sections.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            out.append(KeyDoc(key, defaults[name][f.name], tuple(map(str, C.CHOICES.get(key, ()))),
                              _first_sentence(docs.get(f.name, ""))))
    docs = field_docs(C.Config)
    for f in dataclasses.fields(C.Config):
        if f.name in sections or f.name == "env":
            continue
        out.append(KeyDoc(f.name, defaults[f.name], tuple(map(str, C.CHOICES.get(f.name, ()))),
                          _first_sentence(docs.get(f.name, ""))))
    return out


def env_keys(env_id: str) -> list[KeyDoc]:
    """The ``env.*`` keys of one env (defaults from its params class, docs from its ``Attributes:``)."""
    spec = envs.REGISTRY[env_id]
    docs = attribute_docs(spec.params)
    defaults = dataclasses.asdict(spec.params())
    return [KeyDoc(f"env.{f.name}", defaults[f.name], (), _first_sentence(docs.get(f.name, "")))
            for f in dataclasses.fields(spec.params)]


def _value(v: Any) -> str:
    return "none" if v is None else json.dumps(list(v) if isinstance(v, tuple) else v, ensure_ascii=False)


def format_keys(rows: list[KeyDoc], width: int = 118) -> str:
    """Rows as ``key = default  [choices]  doc`` lines, the docs wrapped under the key."""
    lines = []
    for r in rows:
        head = f"{r.key} = {_value(r.default)}" + (f"  ({' | '.join(r.choices)})" if r.choices else "")
        lines.append(head)
        if r.doc:
            lines += textwrap.wrap(r.doc, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def compact_keys() -> str:
    """One short line per key (``key=default``, choices): the epilog of ``reflab run --help``."""
    parts = []
    for r in config_keys():
        parts.append(f"  {r.key}={_value(r.default)}" + (f" ({'|'.join(r.choices)})" if r.choices else ""))
    return ("config keys (KEY=default (choices); docs and env.* keys: reflab config, reflab config --env ID):\n"
            + "\n".join(parts))


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``reflab config``."""
    p.description = ("Without SPEC: every config key with its default, valid values and doc. With a preset name, "
                     "a grid file or a run config file: its resolved config (with --set overrides) as YAML.")
    p.add_argument("spec", nargs="?", metavar="PRESET|FILE", help="a preset name, a grid YAML or a run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key (grids: KEY=a,b makes an axis, as reflab sweep --set)")
    p.add_argument("--env", default=None, metavar="ID",
                   help=f"list the env.* keys of one env ({', '.join(envs.REGISTRY)})")


def main(args: argparse.Namespace) -> int:
    """``reflab config``: print keys, or a resolved config; 2 on bad input."""
    if args.env is not None:
        if args.env not in envs.REGISTRY:
            raise UsageError(f"--env must be one of {', '.join(envs.REGISTRY)}; got {args.env!r}")
        print(format_keys(env_keys(args.env)))
        return 0
    if args.spec is None:
        if args.set:
            print(yaml.safe_dump(_resolve_run(None, args.set).to_dict(), sort_keys=False, allow_unicode=True))
            return 0
        print(format_keys(config_keys()))
        return 0
    from sim.lab import grid as G

    try:
        grid, path = G.load_grid(args.spec)
    except ConfigError:
        grid, path = None, None
    if grid is not None and set(grid) <= set(G.GRID_KEYS):
        grid = G.apply_sets(grid, args.set, args.spec, path.parent)
        plan = G.plan_sweep(grid, args.spec, path.parent)
        print(f"# {args.spec}: {len(plan.runs)} runs; the base config every run starts from (resolved):")
        print(yaml.safe_dump(plan.base, sort_keys=False, allow_unicode=True).rstrip())
        print("# swept: " + (", ".join(f"{k} ∈ {sorted({_value(r.columns[k]) for r in plan.runs})}"
                                      for k in plan.swept_keys) or "nothing") + f"; seeds {plan.seeds}")
        return 0
    print(yaml.safe_dump(_resolve_run(args.spec, args.set).to_dict(), sort_keys=False, allow_unicode=True))
    return 0


def _resolve_run(path: str | None, sets: list[str]) -> C.Config:
    from sim.lab import dispatch

    return dispatch.resolve(path, sets, effects="strict")
