"""The ``reflab`` command line.

``reflab run [CONFIG.yaml] [--set KEY=VALUE ...] --out DIR`` trains one run and writes its folder.
Bad input prints one line ``reflab: error: ...`` naming the key and its valid choices, exits 2 and writes
nothing.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

from sim.config import ConfigError, UsageError, resolve


def _fail(msg: str) -> int:
    print(f"reflab: error: {msg}", file=sys.stderr)
    return 2


def check_writable_dir(path: Path, flag: str = "--out") -> None:
    """Raise :class:`UsageError` unless ``path`` is (or can be created as) a writable folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {str(path)!r} exists and is not a folder")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not _access_w(probe):
        raise UsageError(f"{flag} {str(path)!r} is not writable")


def _access_w(p: Path) -> bool:
    import os

    return os.access(p, os.W_OK | os.X_OK)


def cmd_run(args: argparse.Namespace) -> int:
    from sim import results
    from sim.progress import progress
    from sim.train import make_trainer, resolve_device

    cfg = resolve(args.config, args.set)
    out = Path(args.out)
    check_writable_dir(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    try:  # building the trainer checks what needs the env (e.g. train.init's length) before anything is written
        trainer = make_trainer([cfg], device)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    results.start_run(out, cfg, device)
    try:
        mode = "none" if args.quiet else cfg.log.progress
        with progress(f"run {out.name}", cfg.train.total_updates, mode) as advance:
            (output,) = trainer.run(lambda done, total: advance(done, total))
    except Exception as e:  # a crash is recorded, never silently lost
        results.fail_run(out, f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    results.finish_run(out, output.tables(), output.status)
    m = output.metrics.iloc[-1]
    summary = (f"{output.status['status']}: {out} | reward {m['reward']:.4f} kl_true {m['kl_true']:.4f} "
               f"entropy {m['entropy']:.4f} tv_opt {m['tv_opt']:.4f} ({output.status['wall_time_s']:.1f}s)")
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train one run and write its folder")
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key (YAML value), repeatable")
    p.add_argument("--out", required=True, help="output folder of the run")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_run)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list:
    """Sub-commands defined in other modules (sweeps, reports, benchmarks), when present."""
    regs = []
    for mod_name in ("sim.sweep", "sim.bench", "analysis.report"):
        try:
            mod = __import__(mod_name, fromlist=["register_cli"])
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue
        regs.append(mod.register_cli)
    return regs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed one line; keep its exit code (2 for bad flags)
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError) as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
