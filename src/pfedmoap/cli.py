"""`pfedmoap run | resume | report | info | data check`: arguments in, a config out, the library called.

Bad input anywhere is one line `error: ...` and exit code 2, on every rank.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

from . import algorithms
from .errors import PFedMoAPError, ReportedElsewhere


log = logging.getLogger(f"{__package__}.cli")     # not __name__: `python -m pfedmoap.cli` runs as __main__


def _out(text: str) -> None:
    """Print a result to stdout. A reader that goes away (`pfedmoap table runs T | head`) raises
    BrokenPipeError here once; stdout is then pointed at /dev/null so that nothing (not the
    interpreter's last flush either) writes to the closed pipe again, and main ends quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _drop_stdout()
        raise


def _drop_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


EXIT_PIPE = 128 + signal.SIGPIPE       # what a shell shows for a writer its reader left
_running = {"out": None}               # the run directory being run on this rank 0, if any


class _UsageError(PFedMoAPError):
    """Bad command-line syntax (argparse's errors), as one line instead of usage + message."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: --if-exists 'maybe': expected one of refuse, ...`.
    Subcommand parsers are built with the same class."""

    def error(self, message: str):
        m = re.fullmatch(r"argument (.+?): invalid choice: (.+?) \(choose from (.+)\)", message)
        if m:
            choices = ", ".join(c.strip().strip("'\"") for c in m.group(3).split(","))
            message = f"{m.group(1)} {m.group(2)}: expected one of {choices}"
        else:
            message = f"{message} (see: {self.prog} --help)"
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pfedmoap", description="Personalized federated prompt learning for CLIP "
                                "(pFedMoAP and baselines) on MPI clusters.")
    sub = p.add_subparsers(dest="command", required=True)
    v = _Parser(add_help=False)         # every command: how much the library tells on the console
    v.add_argument("-v", "--verbose", action="count", default=0, help="more messages (e.g. phase times per round)")
    v.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    methods = "\n".join(f"  {m.name:<12} {m.label}{f' [{m.section}]' if m.section else ''}: {m.summary}"
                        for m in algorithms.manifests())
    run = sub.add_parser("run", parents=[v], help="run a configuration (no CONFIG: the embedded quick-start)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=f"methods (--set algorithm=NAME; [section]: its options):\n{methods}")
    run.add_argument("config", nargs="?", help="TOML file")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set data.beta=0.1 --set algorithm=NAME (NAME: "
                          f"{', '.join(m.name for m in algorithms.manifests())})")
    run.add_argument("--out", help="run directory (default: the config's `out`)")
    run.add_argument("--if-exists", choices=("refuse", "resume", "overwrite"), default="refuse",
                     help="when the run directory already holds a run (default: refuse)")
    run.add_argument("--with", dest="overlays", action="append", default=[], metavar="OVERLAY",
                     help="a partial config applied on top of CONFIG, before --set, e.g. "
                          "--with paper/methods/coop (repeatable, in order)")
    run.add_argument("--table", metavar="TABLE", help="run a paper table's runs instead of CONFIG, into "
                     "OUT/<table>/<column>/<row>/seed<k> (OUT: --out, default runs/paper; see: pfedmoap table list)")
    run.add_argument("--tables", metavar="FILE", help="with --table: the tables file (default: the packaged one)")
    run.add_argument("--index", type=int, action="append", default=[], metavar="I",
                     help="with --table: only run I (repeatable; pfedmoap table runs TABLE lists them)")
    res = sub.add_parser("resume", parents=[v], help="continue a run from its checkpoint")
    res.add_argument("run_dir")
    rep = sub.add_parser("report", parents=[v], help="tables (and figures) from finished or running runs")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--format", choices=("table", "csv", "markdown", "latex"), default="table",
                     help="latex: with --table only")
    rep.add_argument("--table", metavar="TABLE", help="print this paper table (methods x data sets, mean ± std "
                     "over seeds) from the runs under RUN_DIRS (a table's OUT of pfedmoap run --table)")
    rep.add_argument("--tables", metavar="FILE", help="with --table: the tables file (default: the packaged one)")
    rep.add_argument("--plot", metavar="DIR", help="write PNG figures to DIR")
    rep.add_argument("--follow", action="store_true", help="one run being written: print each round as it "
                     "lands, until the run is complete or stopped (or Ctrl-C)")
    sub.add_parser("info", parents=[v], help="versions, MPI library, world size, devices")
    data = sub.add_parser("data", help="data-set tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    from .data.datasets import available
    chk = dsub.add_parser("check", parents=[v], help="validate a data root and print per-split counts",
                          description="Load a data set from its root, open and decode every image it "
                          "uses, and print its split counts, classes and domains; a wrong layout is one "
                          "line naming the path and the layout expected (docs/reproducing.md).")
    chk.add_argument("--dataset", required=True, metavar="NAME",
                     help=f"the data set: one of {', '.join(available())}")
    chk.add_argument("--root", default="", metavar="DIR",
                     help="the folder that holds it (data.root; the embedded ones need none)")
    chk.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="any other data key as a run would get it, e.g. --set data.domains=clipart,sketch")
    tab = sub.add_parser("table", parents=[v], help="the paper's tables: list them, or one table's runs")
    tab.add_argument("action", choices=("list", "runs"))
    tab.add_argument("name", nargs="?", metavar="TABLE")
    tab.add_argument("--tables", metavar="FILE", help="the tables file (default: the packaged one)")
    tab.add_argument("--out", default="runs/paper", help="the OUT the run directories are listed under")
    tab.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="shown in the listed commands as pfedmoap run --table would apply it")
    tab.add_argument("--count", action="store_true", help="print only the number of runs")
    return p


def _configs(args) -> list:
    from . import comm as comm_mod, config
    if args.table or args.tables or args.index:
        from . import tables
        if not args.table:
            raise PFedMoAPError("--tables and --index go with --table TABLE")
        if args.config or args.overlays:
            raise PFedMoAPError(f"--table {args.table}: the table names each run's config and overlays; "
                                "give no CONFIG or --with (use --set for every run)")
        cfgs = tables.configs_for(args.table, args.out or "runs/paper", args.sets, args.index, args.tables)
        if args.if_exists != "resume":
            return cfgs
        todo = [c for c in cfgs if not tables.is_complete(c)]       # complete runs are kept as they are
        if len(todo) < len(cfgs) and comm_mod.launcher_rank() == 0:
            _out(f"# table {args.table}: {len(cfgs) - len(todo)} of {len(cfgs)} runs already complete: kept")
        return todo
    from . import algorithms
    base = None if args.config else config.QUICKSTART
    picked = any(s.split("=", 1)[0].strip() == "algorithm" for s in args.sets)
    single = bool(args.config or picked or args.overlays)
    # --set of another method's key: refused for one run; in the quick-start it goes to the methods it belongs to
    cfg = config.load(args.config, args.sets, base=base, overlays=args.overlays,
                      other_methods="refuse" if single else "skip")
    if args.out:
        cfg.out = args.out
    if single:
        return [cfg]
    # The quick-start compares every method on the same split, seed and budget.
    out = []
    for name in [m.name for m in algorithms.manifests() if m.quickstart]:
        c = config.load(None, args.sets + [f"algorithm={name}"], base=config.QUICKSTART, other_methods="skip")
        c.out = str(Path(cfg.out) / name)
        out.append(c)
    return out


def _run(configs, comm, if_exists: str) -> int:
    from . import config, federation
    from .data.partition import partition_summary
    say = log.info if comm.rank == 0 else (lambda *a, **k: None)      # the run's progress (-q hides it)
    if not configs:                       # run --table --if-exists resume: every run was complete
        say("nothing left to run")
        return 0
    outcomes = []
    try:
        for cfg in configs:
            _running["out"] = cfg.out
            say(_header(cfg, comm.size))
            fed = federation.Federation(cfg, comm)
            say(_clip_lines(partition_summary(fed.partition, fed.dataset), 21))
            outcome = fed.run(cfg.out, if_exists)
            outcomes.append((cfg, outcome))
            if outcome.status == "stopped":
                if comm.rank == 0:
                    _out(f"stopped on a signal; checkpoint written to {cfg.out}; resume with: pfedmoap resume {cfg.out}")
                return federation.EXIT_STOPPED
    finally:
        _running["out"] = None
    if comm.rank == 0:
        _out(_final_table(outcomes))
        if len(configs) > 1 and all(c.rounds == config.QUICKSTART["rounds"] for c in configs):
            _out(config.QUICKSTART_NOTE)
    return 0


def _header(cfg, size: int) -> str:
    """One line per run (the full config is in results.h5): what runs, on what, where; the rounds
    are the method's (a one-round method's 1, whatever `rounds` says)."""
    d = cfg.data
    rounds = algorithms.manifest(cfg.algorithm).rounds_for(cfg)
    return (f"# pfedmoap {cfg.algorithm}: {d.dataset}, {d.partition} partition, {_plural(d.n_clients, 'client')}, "
            f"{_plural(rounds, 'round')}, world size {size} -> {cfg.out}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _refuse_held(configs) -> None:
    """`run` without --if-exists into directories that already hold runs: one line naming the
    first, how many more there are, and the two ways on (store.open_run refuses it again, later)."""
    from .store import has_run
    held = [c.out for c in configs if has_run(Path(c.out))]
    if held:
        more = (f" (and {len(held) - 1} more of this command's {len(configs)} run directories)"
                if len(held) > 1 else "")
        raise PFedMoAPError(f"{held[0]}: already holds a run{more}; pass --if-exists resume to continue "
                            "or --if-exists overwrite to start again, or choose another --out")


def check_writable_dir(path: str, what: str) -> None:
    """`path` is, or can be made as, a directory this process can write in; else one line.

    Checked at start-up so that a file in the way or a read-only directory is not found only
    after the data and model are loaded (or after the first round)."""
    target = Path(path).expanduser()
    probe = target
    while not os.path.exists(probe) and probe.parent != probe:     # os.path: False on any OSError
        probe = probe.parent
    if not os.path.isdir(probe):
        where = "is a file" if probe == target else f"lies below {str(probe)!r}, which is a file"
        raise PFedMoAPError(f"{what} {path!r}: {where}; expected a directory")
    try:      # a real write: permission bits say nothing for root or on a read-only mount
        fd, name = tempfile.mkstemp(dir=probe, prefix=".pfedmoap-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        inside = "" if probe == target else f" (in {str(probe)!r}, where it would be made)"
        raise PFedMoAPError(f"{what} {path!r}: cannot write{inside}: {e.strerror}") from None


def _clip_lines(text: str, n: int) -> str:
    lines = text.splitlines()
    return "\n".join(lines[:n] + ([f"  ... {len(lines) - n} more clients"] if len(lines) > n else []))


def _final_table(outcomes) -> str:
    rounds = max(len(o.mean_accuracy) for _, o in outcomes)
    shown = list(range(rounds))[-10:]           # the last ten rounds at most
    head = f"{'method':<12}" + "".join(f"{'r' + str(i + 1):>8}" for i in shown)
    lines = ["", "mean client accuracy per round (%)", head, "-" * len(head)]
    for cfg, o in outcomes:
        accs = {i: a for i, a in enumerate(o.mean_accuracy)}
        # a one-round method (a frozen model evaluated once) is shown at every round for comparison
        cells = (accs.get(i, o.mean_accuracy[-1]) for i in shown)   # NaN: a round that evaluated nobody
        lines.append(f"{cfg.algorithm:<12}" + "".join(f"{100 * a:8.2f}" if a == a else f"{'-':>8}" for a in cells))
    domains = list(outcomes[0][1].domain_accuracy)
    if len(domains) > 1:
        head = f"{'method':<12}" + "".join(f"{d[:9]:>10}" for d in domains)
        lines += ["", "accuracy per domain at the last round (%, all clients' test images pooled)", head,
                  "-" * len(head)]
        for cfg, o in outcomes:
            lines.append(f"{cfg.algorithm:<12}" + "".join(f"{100 * o.domain_accuracy.get(d, float('nan')):10.2f}"
                                                         for d in domains))
    if any(getattr(getattr(c, "eval", None), "protocol", "personal") != "personal" for c, _ in outcomes):
        # the evaluation protocol's metrics (docs/protocols.md)
        from .analysis.protocols import protocol_table
        from .analysis.runs import load_run
        lines.append(protocol_table([load_run(c.out) for c, _ in outcomes]).rstrip("\n"))
    lines.append(f"results: {', '.join(str(Path(c.out) / 'results.h5') for c, _ in outcomes)}")
    return "\n".join(lines)


def _resume(run_dir: str, comm) -> int:
    from . import comm as comm_mod, config, store
    cfg, error = None, None
    try:
        attrs, _ = store.read_checkpoint(Path(run_dir))
        cfg = config.from_toml(attrs["config"])
        cfg.out = run_dir
        if comm.rank == 0:
            check_writable_dir(run_dir, "run directory")
    except PFedMoAPError as e:
        error = e
    comm_mod.agree(comm, error)
    return _run([cfg], comm, "resume")


def _info(comm) -> int:
    """Versions, methods, world and devices. What needs no torch is printed before torch is imported
    (seconds on a loaded node)."""
    from . import __version__, comm as comm_mod, store
    say = _out if comm.rank == 0 else (lambda text: None)
    say("\n".join([f"pfedmoap {__version__}", f"python {sys.version.split()[0]}",
                   f"methods: {', '.join(m.name for m in algorithms.manifests())}",
                   store.library_versions(), comm_mod.library_versions(), f"world size {comm.size}"]))
    import open_clip
    import torch
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    say("\n".join([f"torch {torch.__version__}", f"open_clip {open_clip.__version__}",
                   f"devices: cpu ({_plural(torch.get_num_threads(), 'thread')})"
                   + "".join(f", cuda:{i} {n}" for i, n in enumerate(cuda))]))
    return 0


def _data_check(args) -> int:
    from . import config
    from .data.disk import DataProblems, check_root
    cfg = config.load(None, args.sets + [f"data.dataset={args.dataset}"] + ([f"data.root={args.root}"] if args.root else []))
    try:
        _out(check_root(cfg.data))
    except DataProblems as e:          # the description, the problems, then the error line
        _out(e.report)
        print(e.listing, file=sys.stderr, flush=True)
        raise
    return 0


def _follow(run_dirs: list[str]) -> int:
    """`pfedmoap report --follow RUN_DIR`: the console's per-round line for each round as it is
    committed to RUN_DIR/results.h5 (wall time: the round's, as recorded), then how the run ended."""
    from . import store
    if len(run_dirs) != 1:
        raise PFedMoAPError(f"report --follow: follows one run directory, got {len(run_dirs)}")
    path = Path(run_dirs[0])
    if path.is_file() and not store.h5py.is_hdf5(path):
        raise PFedMoAPError(f"{path}: not an HDF5 file; expected a pfedmoap run directory or its results.h5")
    if not (path / store.RESULTS).exists() and not path.is_file():
        print(f"# waiting for {path / store.RESULTS}", file=sys.stderr, flush=True)
    for row in store.follow(path):
        _out(store.round_line(row["round"], row["n_rounds"], row["accuracy"], row["participants"],
                              row["evaluated"], row["n_clients"], row["wall_time"], digits=2))
    attrs = store.read_results(path, rounds=False)["attrs"]
    _out(f"# run {attrs['status']}: {attrs['rounds_done']} of {attrs['n_rounds']} rounds"
         + (f"; resume with: pfedmoap resume {path}" if attrs["status"] == "stopped" else ""))
    return 0


class _Console(logging.StreamHandler):
    """The library's messages as plain lines: on the current sys.stdout, warnings and errors on
    sys.stderr as `warning: ...`."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        self.setFormatter(logging.Formatter("warning: %(message)s" if record.levelno >= logging.WARNING
                                            else "%(message)s"))
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError) and self.stream is sys.stdout:
            _stdout_closed()            # `pfedmoap run | head`: no "--- Logging error ---" traceback
        else:
            super().handleError(record)


def _stdout_closed() -> None:
    """stdout's reader went away while a run logs its progress: nothing more goes there, and the
    run is not killed mid-round: it stops at the round's end with its checkpoint, as on SIGTERM,
    and says so on stderr."""
    _drop_stdout()
    if _running["out"] is not None:
        from . import federation
        federation.request_stop()
        print(f"# stdout closed: stopping after this round; resume with: pfedmoap resume {_running['out']}",
              file=sys.stderr, flush=True)
        _running["out"] = None


def _console(verbosity: int) -> None:
    """The library logs to module loggers under `pfedmoap`; the console shows INFO (the per-round
    lines), DEBUG with -v, WARNING and above with -q. Other libraries' loggers are left as they are."""
    log = logging.getLogger(__package__)           # the library's loggers are its modules' names
    if not any(isinstance(h, _Console) for h in log.handlers):    # main() may run several times in a process
        log.addHandler(_Console())
        log.propagate = False
    log.setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO)


def _request_stop(*_args) -> None:
    from . import federation
    federation.request_stop()


def main(argv: list[str] | None = None) -> int:
    from . import comm as comm_mod
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        # every rank has the same arguments: under a launcher only its rank 0 prints
        if comm_mod.launcher_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    _console(args.verbose - args.quiet)
    if args.command in ("run", "resume"):
        # From the first moment: a preemption notice during start-up is honoured at the first
        # round's end instead of killing the rank.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, _request_stop)
    comm = comm_mod.LocalComm()
    try:
        if args.command in ("run", "resume", "info"):
            comm = comm_mod.world()
        if args.command == "run":
            configs, error = None, None
            try:
                configs = _configs(args)      # validated before the heavy imports: bad input fails fast
                if comm.rank == 0:            # the run directories: rank 0 writes them
                    if args.if_exists == "refuse":
                        _refuse_held(configs)     # before any set-up (data, model): seconds, not a minute
                    if args.out:
                        check_writable_dir(args.out, "--out")
                    for cfg in configs:
                        check_writable_dir(cfg.out, "run directory")
                        if cfg.data.cache_dir:          # the feature cache rank 0 writes
                            check_writable_dir(cfg.data.cache_dir, "data.cache_dir")
            except PFedMoAPError as e:        # (a config file may be missing on one node only)
                error = e
            comm_mod.agree(comm, error)
            return _run(configs, comm, args.if_exists)
        if args.command == "resume":
            return _resume(args.run_dir, comm)
        if args.command == "report" and args.follow:
            return _follow(args.run_dirs)
        if args.command == "report":
            from .analysis import report_main
            if args.plot is not None:
                check_writable_dir(args.plot, "--plot")
            _out(report_main(args.run_dirs, args.format, args.plot, table=args.table, tables_file=args.tables))
            return 0
        if args.command == "table":
            from .tables import table_main
            _out(table_main(args.action, args.name, args.tables, args.out, args.count, args.sets))
            return 0
        if args.command == "info":
            return _info(comm)
        if args.command == "data":
            return _data_check(args)
    except ReportedElsewhere:
        return 2
    except PFedMoAPError as e:
        if comm.size > 1 and not getattr(e, "agreed", False):
            comm_mod.fail(comm, e)    # met by this rank alone mid-run: the others must not wait
        # Ranks agree on user errors (comm.agree): exactly one of them prints the line. Without a
        # world (the launcher's processes each alone, see comm.world) the launcher's rank 0 does.
        if comm.size > 1 or comm_mod.launcher_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:          # the reader of stdout went away (| head): no traceback
        _drop_stdout()
        if comm.size > 1:
            comm.abort(EXIT_PIPE)
        return EXIT_PIPE
    except Exception as e:  # noqa: BLE001 - a crash on one rank must end the whole world
        comm_mod.fail(comm, e)
    return 1


if __name__ == "__main__":
    sys.exit(main())
