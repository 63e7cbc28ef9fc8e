"""What fetching an asset needs from the machine: the cache folder, and system tools that fail clearly.

``cache_dir()`` is where every asset lives. ``_require_tool`` and ``_run`` are how the builders in
``effref.asset_builders`` call pip, apt-get and dpkg-deb: a tool that is missing or fails becomes an
``AssetMissingError`` whose message names the tool, the asset and the command to run next. This is the
bottom layer of the asset code: ``effref.asset_builders`` imports it, and ``effref.assets`` (the registry,
``fetch`` and the command line) imports both and re-exports the public names.

Glossary: asset = a named folder in the cache · tool = an external program a builder runs.
Left out: retries and timeouts for network failures (the error says what to re-run).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

CACHE_ENV = "EFFREF_CACHE"
FETCH_COMMAND = "python -m effref.assets fetch"


def cache_dir() -> Path:
    """The folder that holds every fetched asset: ``$EFFREF_CACHE`` if set, else ``~/.cache/effref``.

    Point ``EFFREF_CACHE`` at a shared or persistent disk (a mounted Drive on Colab, a team folder) to
    fetch once and reuse; tests point it at a temporary folder.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "effref"


class AssetMissingError(RuntimeError):
    """An asset is not in the cache, or could not be fetched; the message says what to run.

    ``asset`` names the asset (or corpus) concerned and ``tool`` the missing system tool, when one is
    the cause (``pip``, ``apt-get``, ``dpkg-deb``).
    """

    def __init__(self, message: str, *, asset: str | None = None, tool: str | None = None) -> None:
        super().__init__(message)
        self.asset = asset
        self.tool = tool


def _fetch_hint(name: str) -> str:
    return f"then run `{FETCH_COMMAND} {name}`"


def _require_tool(tool: str, asset: str, install_hint: str) -> None:
    """Raise AssetMissingError naming ``tool`` when it is not usable on this machine."""
    found = importlib.util.find_spec("pip") is not None if tool == "pip" else shutil.which(tool) is not None
    if not found:
        raise AssetMissingError(
            f"cannot fetch asset {asset!r}: the system tool `{tool}` is not available here. "
            f"{install_hint}; {_fetch_hint(asset)} (or copy an already-fetched cache folder into "
            f"{cache_dir()})", asset=asset, tool=tool)


def _require_modules(asset: str, *modules: str) -> None:
    """Raise AssetMissingError when a Python package the builder needs is missing (the ``assets`` extra)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetMissingError(
            f"cannot fetch asset {asset!r}: the Python package(s) {missing} are not installed; "
            f"pip install 'effref[assets]' (the tools the asset fetch needs), {_fetch_hint(asset)}",
            asset=asset, tool=missing[0])


def _run(cmd: Sequence[str], *, asset: str, cwd: Path | None = None) -> str:
    """Run ``cmd``; return its stdout, or raise AssetMissingError with the tail of its stderr."""
    result = subprocess.run(list(cmd), check=False, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        shown = " ".join(Path(cmd[0]).name if i == 0 else part for i, part in enumerate(cmd))
        raise AssetMissingError(
            f"cannot fetch asset {asset!r}: `{shown}` failed with exit status {result.returncode}:\n  "
            + "\n  ".join(tail)
            + f"\nCheck the network access to the package registry, {_fetch_hint(asset)}", asset=asset)
    return result.stdout
