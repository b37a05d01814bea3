"""The paper's tables as runs: rows x columns x seeds, defined in one file.

The packaged definitions live in `configs/paper/tables/tables.toml` (its header documents the
format); another file can be given everywhere with `--tables FILE`. A table's runs are numbered
0 .. n-1 (column, then row, then seed), which is what a SLURM array index selects:

    pfedmoap table list                                  # the tables and their run counts
    pfedmoap table runs fewshot [--count]                # index, run directory, settings
    pfedmoap run --table fewshot --out runs/paper        # every run, one after the other
    pfedmoap run --table fewshot --index 17 --out runs/paper     # run 17 only
    pfedmoap report --table fewshot runs/paper           # the table in the paper's layout

Run k of a table goes to OUT/<table>/<column key>/<row key>/seed<s>. Its config is built in
layers, later layers win: the column's config file <- the column's `set` <- the row's `with`
overlays <- the row's `set` <- the user's --set <- `seed`.

Nothing here imports torch: listing a table is instant (the SLURM submit step runs it).
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import algorithms, config, configs
from .errors import PFedMoAPError

TABLES_FILE = configs.ROOT / "paper" / "tables" / "tables.toml"
# datasets: a column per config; domains: one config's domains + Avg; base2novel: a config's Local /
# Base / Novel / HM (+ their Average); held_out: a column per held-out domain (+ Avg)
LAYOUTS = ("datasets", "domains", "base2novel", "held_out")
_ROW_KEYS = {"name", "key", "with", "set", "missing"}
_COLUMN_KEYS = {"name", "key", "config", "set"}
_TABLE_KEYS = {"title", "rows", "columns", "seeds", "layout", "domains", "domain_labels", "notes"}


@dataclass(frozen=True)
class Row:
    """A line of the table: a method, or one setting of a swept key."""
    name: str
    key: str
    overlays: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    missing: str = ""              # why the row has no runs (a method not implemented here)


@dataclass(frozen=True)
class Column:
    """A data-set config (layout "domains": the one config whose domains become the columns)."""
    name: str
    key: str
    config: str = ""               # packaged name or path; "" = the built-in defaults
    sets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    seeds: tuple[int, ...]
    layout: str = "datasets"
    domains: tuple[str, ...] = ()
    domain_labels: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def runs(self) -> list[RunSpec]:
        """Every run of the table, numbered column by column, then row, then seed; rows marked
        `missing` have none."""
        out = []
        for column in self.columns:
            for row in self.rows:
                if row.missing:
                    continue
                for seed in self.seeds:
                    out.append(RunSpec(len(out), self, row, column, seed))
        return out

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)

    def column(self, key: str) -> Column | None:
        return next((c for c in self.columns if c.key == key), None)

    def domain_label(self, domain: str) -> str:
        return str(self.domain_labels.get(domain, domain))


@dataclass(frozen=True)
class RunSpec:
    """One run of a table: a (row, column, seed) cell."""
    index: int
    table: Table
    row: Row
    column: Column
    seed: int

    def out(self, root: str | Path) -> Path:
        return Path(root) / self.table.name / self.column.key / self.row.key / f"seed{self.seed}"

    def overrides(self, sets=()) -> list[str]:
        """The `--set` layer: the row's settings, then the user's, then the seed."""
        return [*self.row.sets, *sets, f"seed={self.seed}"]

    def overlays(self) -> list:
        """Between the config file and the overrides: the column's settings, then the row's files."""
        column = [dict(_key_value(s, f"column {self.column.name!r}") for s in self.column.sets)]
        return [c for c in column if c] + list(self.row.overlays)

    def config(self, root: str | Path, sets=()):
        """The run's resolved, validated Config, writing to `out(root)`."""
        # a table's --set is shared by its rows' methods: a key of another method's section is left out
        cfg = config.load(self.column.config or None, self.overrides(sets), overlays=self.overlays(),
                          other_methods="skip")
        cfg.out = str(self.out(root))
        return cfg

    def command(self, root: str | Path, sets=(), tables_file=None) -> str:
        """A `pfedmoap run` line that runs exactly this run (for logs and listings): the layers
        spelled out where a command line applies them in the table's order (a config file, the
        row's overlays, then the --set layer). Otherwise the table's own run, `pfedmoap run --table
        ... --index I`: a column without a config file (`pfedmoap run` without CONFIG starts from
        the quick-start, not the built-in defaults) or column settings under a row's overlays
        (on a command line every --set comes after every --with)."""
        if not self.column.config or (self.column.sets and self.row.overlays):
            parts = [f"pfedmoap run --table {self.table.name}"] + ([f"--tables {tables_file}"] if tables_file else [])
            parts += [f"--index {self.index}"] + [f"--set {s}" for s in sets]
            return " ".join(parts + [f"--out {root}"])
        parts = ["pfedmoap run", self.column.config]
        parts += [f"--set {s}" for s in self.column.sets]
        parts += [f"--with {o}" for o in self.row.overlays]
        parts += [f"--set {s}" for s in self.overrides(sets)]
        return " ".join(parts + [f"--out {self.out(root)}"])


# --------------------------------------------------------------------------------- reading

def _key_value(item, where: str) -> tuple[str, str]:
    if not isinstance(item, str) or "=" not in item:
        raise PFedMoAPError(f"{where}: set entry {item!r}: expected 'key=value'")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "_", name.lower()).strip("_") or "x"


def _strings(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PFedMoAPError(f"{where}: {value!r}: expected a list of strings")
    return tuple(value)


def _path_beside(value: str, base: Path) -> str:
    """A relative file path is looked up beside the tables file first (then as given: the
    current directory or a packaged name)."""
    if value and not Path(value).is_absolute() and (base / value).is_file():
        return str(base / value)
    return value


def _entries(value, where: str, allowed: set, base: Path, kind: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise PFedMoAPError(f"{where}: expected a non-empty list of {kind}s ({{name = ..., ...}})")
    out, keys = [], set()
    for i, entry in enumerate(value):
        here = f"{where}[{i}]"
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise PFedMoAPError(f"{here}: unknown key {unknown[0]!r} (expected {', '.join(sorted(allowed))})")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise PFedMoAPError(f"{here}: expected a name")
        key = entry.get("key", _slug(name))
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", key) or key in (".", ".."):
            raise PFedMoAPError(f"{here}: key {key!r}: expected letters, digits, '.', '_' or '-' "
                                "(it names a directory)")
        if key in keys:
            raise PFedMoAPError(f"{here}: key {key!r} is used twice in this table")
        keys.add(key)
        entry = dict(entry, name=name, key=key)
        for k in ("with", "set"):
            if k in entry:
                entry[k] = _strings(entry[k], f"{here}.{k}")
                if k == "set":
                    for item in entry[k]:
                        key_, value = _key_value(item, f"{here}")
                        if key_ == "algorithm" and value not in algorithms.names():   # before any run is built
                            raise PFedMoAPError(f"{here}: algorithm = {value!r}: expected one of "
                                                f"{', '.join(algorithms.names())}")
        if "with" in entry:
            entry["with"] = tuple(_path_beside(v, base) for v in entry["with"])
        if "config" in entry:
            if not isinstance(entry["config"], str):
                raise PFedMoAPError(f"{here}.config: expected a string")
            entry["config"] = _path_beside(entry["config"], base)
        if "missing" in entry and not isinstance(entry["missing"], str):
            raise PFedMoAPError(f"{here}.missing: expected a string (why the row has no runs)")
        out.append(entry)
    return out


def _read(path) -> tuple[dict, Path]:
    file = Path(path).expanduser() if path else TABLES_FILE
    try:
        data = tomllib.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise PFedMoAPError(f"tables file {str(file)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PFedMoAPError(f"tables file {str(file)!r} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise PFedMoAPError(f"tables file {str(file)!r} is not valid TOML: {e}") from None
    if not isinstance(data.get("tables"), dict) or not data["tables"]:
        raise PFedMoAPError(f"tables file {str(file)!r}: no [tables.NAME] section")
    return data, file


def load(path: str | Path | None = None) -> dict[str, Table]:
    """Every table of the tables file (default: the packaged one), checked: one PFedMoAPError
    naming the table and entry for a mistake."""
    data, file = _read(path)
    base = file.parent
    named_rows = data.get("rows", {})
    default_seeds = data.get("seeds", [1, 2, 3])
    out = {}
    for name, t in data["tables"].items():
        where = f"{file.name}: tables.{name}"
        if not isinstance(t, dict):
            raise PFedMoAPError(f"{where}: expected a table")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise PFedMoAPError(f"{where}: expected a name of letters, digits, '.', '_' or '-'")
        unknown = sorted(set(t) - _TABLE_KEYS)
        if unknown:
            raise PFedMoAPError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(_TABLE_KEYS))})")
        rows = t.get("rows")
        if isinstance(rows, str):
            if rows not in named_rows:
                raise PFedMoAPError(f"{where}.rows = {rows!r}: no such list under [rows] "
                                    f"(there: {', '.join(named_rows) or 'none'})")
            rows = named_rows[rows]
        columns = t.get("columns")
        if isinstance(columns, str):
            other = data["tables"].get(columns)
            if not isinstance(other, dict) or isinstance(other.get("columns"), str):
                raise PFedMoAPError(f"{where}.columns = {columns!r}: expected the name of a table "
                                    "that lists its own columns")
            columns = other["columns"]
        rows = _entries(rows, f"{where}.rows", _ROW_KEYS, base, "row")
        columns = _entries(columns, f"{where}.columns", _COLUMN_KEYS, base, "column")
        seeds = t.get("seeds", default_seeds)
        if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
            raise PFedMoAPError(f"{where}.seeds = {seeds!r}: expected a list of distinct integers >= 0")
        layout = t.get("layout", "datasets")
        if layout not in LAYOUTS:
            raise PFedMoAPError(f"{where}.layout = {layout!r}: expected one of {', '.join(LAYOUTS)}")
        if layout == "domains" and len(columns) != 1:
            raise PFedMoAPError(f"{where}: layout 'domains' takes one column (its domains are the "
                                f"columns); got {len(columns)}")
        labels = t.get("domain_labels", {})
        if not isinstance(labels, dict):
            raise PFedMoAPError(f"{where}.domain_labels: expected a table of domain = label")
        out[name] = Table(
            name=name, title=str(t.get("title", name)),
            rows=tuple(Row(r["name"], r["key"], r.get("with", ()), r.get("set", ()), r.get("missing", ""))
                       for r in rows),
            columns=tuple(Column(c["name"], c["key"], c.get("config", ""), c.get("set", ()))
                          for c in columns),
            seeds=tuple(seeds), layout=layout, domains=_strings(t.get("domains", []), f"{where}.domains"),
            domain_labels=dict(labels), notes=_strings(t.get("notes", []), f"{where}.notes"))
    return out


def get(name: str, path: str | Path | None = None) -> Table:
    tables = load(path)
    if name not in tables:
        raise PFedMoAPError(f"table {name!r}: not in {str(Path(path) if path else TABLES_FILE)!r} "
                            f"(tables: {', '.join(tables)})")
    return tables[name]


def select(table: Table, indices=()) -> list[RunSpec]:
    """The runs with these indices (all when none is given); an index out of range is an error."""
    runs = table.runs()
    if not indices:
        return runs
    bad = [i for i in indices if not 0 <= i < len(runs)]
    if bad:
        raise PFedMoAPError(f"--index {bad[0]}: table {table.name!r} has {len(runs)} runs "
                            f"(indices 0 to {len(runs) - 1}; see: pfedmoap table runs {table.name})")
    return [runs[i] for i in dict.fromkeys(indices)]


def configs_for(name: str, out: str | Path, sets=(), indices=(), path=None) -> list:
    """The validated Configs of a table's runs (`pfedmoap run --table`)."""
    return [spec.config(out, sets) for spec in select(get(name, path), indices)]


def is_complete(cfg) -> bool:
    """`cfg.out` already holds a complete run of this very config (results.h5 status `complete`,
    the same config hash): `pfedmoap run --table ... --if-exists resume` keeps it as it is."""
    from .store import RESULTS, read_results
    if not (Path(cfg.out) / RESULTS).is_file():
        return False
    try:
        attrs = read_results(cfg.out, rounds=False)["attrs"]
    except PFedMoAPError:
        return False
    return attrs.get("status") == "complete" and config.recorded_run_hash(attrs) == config.run_hash(cfg)


# ---------------------------------------------------------------------------- `pfedmoap table`

def table_main(action: str, name: str | None = None, path=None, out: str = "runs/paper",
               count: bool = False, sets=()) -> str:
    """What `pfedmoap table list` and `pfedmoap table runs NAME [--count]` print."""
    if action == "list":
        if name:
            raise PFedMoAPError("table list: takes no table name (to list one table's runs: "
                                f"pfedmoap table runs {name})")
        lines = []
        tables = load(path)
        width = max(len(n) for n in tables)
        for t in tables.values():
            missing = [r.name for r in t.rows if r.missing]
            lines.append(f"{t.name:<{width}}  {len(t.runs()):4d} runs  {t.title}"
                         + (f"  [missing: {', '.join(missing)}]" if missing else ""))
        return "\n".join(lines)
    if not name:
        raise PFedMoAPError("table runs: expected a table name (pfedmoap table list shows them)")
    table = get(name, path)
    runs = table.runs()
    if count:
        return str(len(runs))
    lines = [f"{s.index}\t{s.out(out)}\t{s.command(out, sets, path)}" for s in runs]
    lines += [f"-\t(no run)\t{r.name}: {r.missing}" for r in table.rows if r.missing]
    return "\n".join(lines)
