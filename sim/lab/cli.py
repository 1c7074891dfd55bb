"""The ``reflab`` command line.

``reflab run [CONFIG.yaml] [--set KEY=VALUE ...] --out DIR`` trains one run and writes its folder; ``sweep``,
``status``, ``report`` and ``bench`` are listed in :data:`COMMANDS`. Each command's module gives its
arguments (``add_arguments``) and its handler (``main``) and is imported only when that command runs, so
``reflab --help`` starts fast. Bad input prints one line ``reflab: error: ...`` naming the key and its valid
choices, exits 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sim import yamlsafe
from sim.config import ConfigError, UsageError, get_dotted

AddArguments = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """A sub-command: its one-line help and a loader returning its ``(add_arguments, main)``."""

    help: str
    load: Callable[[], tuple[AddArguments, Handler]]


# -- reflab run ---------------------------------------------------------------------------------------------


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Train one run (defaults <- CONFIG.yaml <- --set overrides) and write its folder."
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key (YAML value), repeatable")
    p.add_argument("--out", required=True, help="output folder of the run")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--max-yaml-values", type=int, default=yamlsafe.MAX_VALUES, metavar="N",
                   help="refuse a config file or --set value of more than N YAML values once aliases are expanded "
                        f"(default {yamlsafe.MAX_VALUES})")
    p.formatter_class = KeysEpilogFormatter
    p.epilog = KEYS_EPILOG


#: The epilog of ``reflab run --help``: replaced by the list of config keys when the help is printed, so that
#: parsing a command line imports nothing the keys' list needs (:mod:`sim.lab.keys` reads every env's params).
KEYS_EPILOG = "{config keys}"


class KeysEpilogFormatter(argparse.RawDescriptionHelpFormatter):
    """Help formatter that writes :data:`KEYS_EPILOG` as :func:`sim.lab.keys.compact_keys` (computed only when
    the help is printed)."""

    def add_text(self, text: str | None) -> None:
        if text == KEYS_EPILOG:
            from sim.lab.keys import compact_keys

            text = compact_keys()
        super().add_text(text)


def plain(text: str) -> str:
    """Help text without docstring markup (````x```` → ``x``)."""
    return text.replace("``", "")


def run_main(args: argparse.Namespace) -> int:
    """``reflab run``: 0 when the run finished (done or diverged), 1 if it crashed, 2 on bad input.

    The config is read and checked by :mod:`sim.config` before torch and the trainers are imported, so a bad
    ``kl.*`` or ``train.*`` key or value fails in a fraction of a second; an ``env.*`` error needs the env's
    module (torch)."""
    from sim.config import resolve

    if args.max_yaml_values < 1:
        raise UsageError("--max-yaml-values must be a positive integer")
    cfg = resolve(args.config, args.set, effects="strict", max_values=args.max_yaml_values,
                  flag="--max-yaml-values")  # one run: every key must act
    import torch

    from sim.lab import dispatch, runs
    from sim.lab.progress import progress

    cfg = dispatch.check_config(cfg)
    out = Path(args.out)
    runs.check_writable_dir(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dispatch.resolve_device(cfg.device)
    trainer = dispatch.make_trainer([cfg], device)
    runs.start_run(out, cfg, device)
    try:
        mode = "none" if args.quiet else cfg.log.progress
        with progress(f"run {out.name}", cfg.train.total_updates, mode) as advance:
            (output,) = trainer.run(lambda done, total: advance(done, total))
    except Exception as e:  # a crash is recorded, never silently lost
        runs.fail_run(out, f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    from sim.lab.grid import ALWAYS_COLUMNS
    from sim.lab.run_ids import run_id

    cfg_dict = cfg.to_dict()
    keys = {"run_id": run_id(cfg), "seed": cfg.seed, **{k: get_dotted(cfg_dict, k) for k in ALWAYS_COLUMNS}}
    runs.finish_run(out, output.tables(), output.status, keys)
    m = output.metrics.iloc[-1]
    nan = float("nan")  # a column a run kind does not log (best-of-n samples no batch: no reward)
    summary = (f"{output.status['status']}: {out} | reward {m.get('reward', nan):.4f} kl_true {m['kl_true']:.4f} "
               f"entropy {m['entropy']:.4f} tv_opt {m.get('tv_opt', nan):.4f} ({output.status['wall_time_s']:.1f}s)")
    print(summary)
    return 0


# -- the command table ----------------------------------------------------------------------------------------


def _run() -> tuple[AddArguments, Handler]:
    return add_run_arguments, run_main


def _sweep() -> tuple[AddArguments, Handler]:
    from sim.lab import sweep

    return sweep.add_arguments, sweep.main


def _status() -> tuple[AddArguments, Handler]:
    from sim.lab import sweep

    return sweep.add_status_arguments, sweep.status_main


def _report() -> tuple[AddArguments, Handler]:
    from analysis import report

    return report.add_arguments, report.main


def _config() -> tuple[AddArguments, Handler]:
    from sim.lab import keys

    return keys.add_arguments, keys.main


def _export() -> tuple[AddArguments, Handler]:
    from analysis import export

    return export.add_arguments, export.main


def _bench() -> tuple[AddArguments, Handler]:
    from sim.lab import bench

    return bench.add_arguments, bench.main


COMMANDS: dict[str, Command] = {
    "run": Command("train one run and write its folder", _run),
    "sweep": Command("train a grid of runs (a grid YAML or a preset name) into one folder", _sweep),
    "status": Command("count a sweep's runs by status, or show a run folder's status", _status),
    "report": Command("figures, a summary table and index.md for a run or sweep folder", _report),
    "config": Command("list every config key (default, values, doc), or show a preset's resolved config", _config),
    "export": Command("export a run or sweep to TensorBoard for browsing", _export),
    "bench": Command("measure engine throughput on this machine", _bench),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The ``reflab`` parser; only the command named in ``argv`` (if any) gets its arguments, so that
    ``reflab --help`` imports none of the commands."""
    parser = argparse.ArgumentParser(prog="reflab", description="The reflab command line: train runs and sweeps "
                                     "of KL placements x estimators, report and export them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            add_arguments, handler = command.load()
            add_arguments(p)
            if p.description:
                p.description = plain(p.description)
            p.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed one line; keep its exit code (2 for bad flags)
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError) as e:
        print(f"reflab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
