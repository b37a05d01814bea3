"""Run configs shipped inside the package, usable by name.

`paper/` holds one file per data set of the pFedMoAP paper (ICLR 2025, Table 5). A config is given
to `pfedmoap run` as a path, or by name: `paper/food101`, `food101` (or with `.toml`).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import PFedMoAPError

ROOT = Path(__file__).resolve().parent


def packaged() -> list[str]:
    """Names of the packaged configs, as `group/name` (e.g. `paper/food101`), sorted."""
    return sorted(p.relative_to(ROOT).with_suffix("").as_posix() for p in ROOT.glob("*/*.toml"))


def find(name_or_path: str | Path) -> Path:
    """A config file: an existing file path wins; else a packaged name (`paper/food101`, `food101`).

    An unknown name is one PFedMoAPError listing the packaged names."""
    given = str(name_or_path)
    path = Path(given).expanduser()
    if path.is_file():
        return path
    key = given.strip().removesuffix(".toml").strip("/")
    names = packaged()
    if key in names:
        return ROOT / f"{key}.toml"
    matches = [n for n in names if n.rsplit("/", 1)[-1] == key] if key and "/" not in key else []
    if len(matches) == 1:
        return ROOT / f"{matches[0]}.toml"
    why = f"is one of several packaged configs ({', '.join(matches)}); name the group" if matches else \
        "does not exist and is not a packaged config name"
    raise PFedMoAPError(f"config file {given!r} {why} (packaged: {', '.join(names) or 'none'})")
