"""Text corpora by name, each with one fixed train / validation / test split, and a calibration sampler.

Perplexity numbers only compare when everyone reads the same held-out text, and compression methods
(GPTQ, AWQ, SparseGPT, Wanda …) calibrate on a few random windows of *training* text. This module pins
both down:

- ``load_corpus(name)`` returns a :class:`Corpus` whose three splits never overlap.
  ``austen`` (the offline default): test = *Emma*, validation = *Persuasion*, train = the other four
  novels. ``sample``: 12.7 KB shipped inside the package (the opening pages of *Pride and Prejudice* and
  *Sense and Sensibility*), cut 80/10/10 at paragraph boundaries — for smoke tests only.
  ``wikitext2``: WikiText-2 (raw), the corpus the quantization papers report, through the optional
  ``datasets`` package and the Hugging Face hub (online only).
  Three more domains, read from what every Python install has, for data selection (mixtures of domains):
  ``pydoc`` — the language reference topics of ``pydoc_data.topics`` (English technical prose);
  ``stdlib`` — the source of the standard library's top-level modules (``Lib/*.py``, code);
  ``licenses`` — the license texts of ``/usr/share/common-licenses`` (Debian, Ubuntu), or where that
  folder is missing the license files of the core dependencies' installed distributions (legal prose).
  Each is its documents joined in sorted order by blank lines and cut 80/10/10 by characters at the
  nearest blank lines. ``pydoc`` and ``stdlib`` are deterministic for one Python version (3.11.7 reads
  other text than 3.12), ``licenses`` for one operating system; we read them live instead of shipping a
  snapshot because they are megabytes of text whose only purpose is to be *other* than Austen, and their
  ``source`` field names the version, so a number can be traced to the text it came from.
- ``tokenize(tokenizer, text)`` turns a split into one long 1-D tensor of token ids, without special
  tokens, memoised because the Austen training split takes ~5 s on 2 cores.
- ``calibration_batches(ids, n, seq_len, seed)`` draws ``n`` contiguous windows of ``seq_len`` tokens at
  seeded random offsets, the protocol of GPTQ (Frantar et al. 2023, §5: 128 random 2048-token segments).

Glossary: split = one of train / validation / test · window = contiguous run of token ids.
Left out: streaming of corpora too large for memory; document-aware windows (a window may cross from
one novel into the next in the training split, as in the papers' concatenated-text protocol).
"""

from __future__ import annotations

import sys
import sysconfig
from collections import OrderedDict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from effref.assets import AssetMissingError, require

CORPORA = ("austen", "sample", "wikitext2", "pydoc", "stdlib", "licenses")
SPLITS = ("train", "validation", "test")
SAMPLE_PATH = Path(__file__).parent / "data" / "sample.txt"


@dataclass(frozen=True)
class Corpus:
    """A named corpus with a fixed three-way split; ``split_note`` says which text went where."""

    name: str
    train: str
    validation: str
    test: str
    source: str
    split_note: str

    def split(self, name: str) -> str:
        """The text of split ``name`` (``"train"``, ``"validation"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"split name={name!r} is not known; use one of {SPLITS}")
        return getattr(self, name)

    def __repr__(self) -> str:  # the default would print megabytes of text
        sizes = ", ".join(f"{s}={len(getattr(self, s)):,} chars" for s in SPLITS)
        return f"Corpus({self.name!r}: {sizes}; {self.split_note})"


def split_paragraphs(text: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
                     ) -> tuple[str, str, str]:
    """Cut ``text`` into three parts of about ``fractions`` of its characters, only at blank lines.

    Each cut goes to the paragraph boundary ("\\n\\n") nearest to its target; the parts, joined back
    with the boundary they were cut at, give ``text`` again.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions={fractions} must be three positive numbers summing to 1, "
                         "e.g. (0.8, 0.1, 0.1)")
    boundaries = [i for i in range(len(text) - 1) if text.startswith("\n\n", i)]
    if len(boundaries) < 2:
        raise ValueError(f"text has {len(boundaries)} paragraph boundaries (blank lines); a three-way "
                         "split needs at least 2")
    targets = (fractions[0] * len(text), (fractions[0] + fractions[1]) * len(text))
    first = min(boundaries, key=lambda b: abs(b - targets[0]))
    second = min((b for b in boundaries if b > first + 1), key=lambda b: abs(b - targets[1]),
                 default=None)
    if second is None:
        raise ValueError("text has no paragraph boundary after the train cut; pass a longer text or "
                         "smaller train fraction")
    parts = (text[:first], text[first + 2:second], text[second + 2:])
    if any(not part.strip() for part in parts):
        raise ValueError(f"the cuts at characters {first} and {second} leave an empty part; pass a text with "
                         "more paragraphs or other fractions")
    return parts


def _load_austen() -> Corpus:
    folder = require("austen")
    novels = {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))}
    held_out = ("persuasion", "emma")
    missing = [name for name in held_out if name not in novels]
    if missing:
        raise AssetMissingError(f"the austen asset at {folder} lacks {missing}; run "
                                "`python -m effref.assets fetch austen --force`", asset="austen")
    train_names = [name for name in novels if name not in held_out]
    return Corpus(
        name="austen",
        train="\n\n".join(novels[name] for name in train_names),
        validation=novels["persuasion"],
        test=novels["emma"],
        source="Jane Austen's novels (public domain) via the R package janeaustenr (Debian "
               "r-cran-janeaustenr)",
        split_note=f"test = Emma; validation = Persuasion; train = the other four novels "
                   f"({', '.join(train_names)}), joined by blank lines",
    )


def _load_sample() -> Corpus:
    train, validation, test = split_paragraphs(SAMPLE_PATH.read_text(encoding="utf-8"))
    return Corpus(
        name="sample", train=train, validation=validation, test=test,
        source="opening pages of Pride and Prejudice and Sense and Sensibility (public domain), shipped "
               "in effref/data/sample.txt",
        split_note="80/10/10 by characters, cut at the nearest blank lines; for smoke tests, not for numbers",
    )


def _load_wikitext2() -> Corpus:
    hint = ("WikiText-2 is read through the optional `datasets` package from the Hugging Face hub, which "
            "needs network access: `pip install datasets` (or effref[hub]); offline, use "
            "load_corpus('austen')")
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise AssetMissingError(f"corpus 'wikitext2' is not available: the `datasets` package is not "
                                f"installed. {hint}", asset="wikitext2") from error
    try:
        parts = load_dataset("wikitext", "wikitext-2-raw-v1")
    except Exception as error:  # offline, hub down, no cache: all mean "not available here"
        raise AssetMissingError(f"corpus 'wikitext2' could not be loaded ({type(error).__name__}: "
                                f"{error}). {hint}", asset="wikitext2") from error
    # The rows are lines that already end in "\n"; GPTQ and its successors join them with "\n\n".
    join = "\n\n".join
    return Corpus(
        name="wikitext2",
        train=join(parts["train"]["text"]),
        validation=join(parts["validation"]["text"]),
        test=join(parts["test"]["text"]),
        source="WikiText-2 raw v1 (Merity et al. 2016, CC BY-SA), Hugging Face `wikitext`",
        split_note="the dataset's own train / validation / test split; rows joined by blank lines as in GPTQ",
    )


PYTHON_VERSION = ".".join(map(str, sys.version_info[:3]))
LICENSES_DIR = Path("/usr/share/common-licenses")
LICENSE_FALLBACK_DISTRIBUTIONS = ("torch", "numpy", "scipy", "transformers", "safetensors", "tqdm", "PyYAML")
SPLIT_NOTE_80_10_10 = ("80/10/10 by characters of the documents joined in sorted order by blank lines, cut at "
                       "the nearest blank lines")


def _split_documents(name: str, documents: dict[str, str], source: str) -> Corpus:
    """Join ``documents`` in sorted key order by blank lines and cut 80/10/10 at blank lines."""
    if not documents:
        raise AssetMissingError(f"corpus {name!r} found no documents ({source})", asset=name)
    text = "\n\n".join(documents[key].strip("\n") for key in sorted(documents))
    train, validation, test = split_paragraphs(text)
    return Corpus(name=name, train=train, validation=validation, test=test, source=source,
                  split_note=f"{SPLIT_NOTE_80_10_10} ({len(documents)} documents)")


def _load_pydoc() -> Corpus:
    from pydoc_data.topics import topics
    return _split_documents("pydoc", dict(topics), f"the {len(topics)} language-reference topics of "
                            f"pydoc_data.topics, Python {PYTHON_VERSION} (PSF license)")


def _load_stdlib() -> Corpus:
    folder = Path(sysconfig.get_paths()["stdlib"])
    modules = {path.name: path.read_text(encoding="utf-8", errors="replace") for path in folder.glob("*.py")}
    return _split_documents("stdlib", modules, f"the top-level modules {folder}/*.py of the standard library, "
                            f"Python {PYTHON_VERSION} (PSF license)")


def _load_licenses() -> Corpus:
    if LICENSES_DIR.is_dir():
        texts = {path.name: path.read_text(encoding="utf-8", errors="replace")
                 for path in LICENSES_DIR.iterdir() if path.is_file()}
        return _split_documents("licenses", texts, f"the license texts of {LICENSES_DIR} (this operating system's)")
    texts = {}
    for distribution in LICENSE_FALLBACK_DISTRIBUTIONS:
        try:
            files = metadata.distribution(distribution).files or []
        except metadata.PackageNotFoundError:
            continue
        for file in files:
            name = file.name.lower()
            if ("licen" in name or "copying" in name) and file.suffix not in (".py", ".pyc"):
                path = Path(file.locate())
                texts[f"{distribution}/{file}"] = path.read_text(encoding="utf-8", errors="replace") \
                    if path.is_file() else ""
    texts = {key: text for key, text in texts.items() if text.strip()}
    return _split_documents("licenses", texts, f"{LICENSES_DIR} is missing here: the license files of the "
                            f"installed {', '.join(LICENSE_FALLBACK_DISTRIBUTIONS)} distributions")


_LOADERS = {"austen": _load_austen, "sample": _load_sample, "wikitext2": _load_wikitext2, "pydoc": _load_pydoc,
            "stdlib": _load_stdlib, "licenses": _load_licenses}


def load_corpus(name: str) -> Corpus:
    """Load corpus ``name`` (one of ``CORPORA``) with its fixed split.

    ``austen`` needs the fetched asset (``python -m effref.assets fetch austen``), ``sample``, ``pydoc``,
    ``stdlib`` and ``licenses`` need nothing but this Python install (and operating system),
    ``wikitext2`` needs ``datasets`` and the network; missing pieces raise AssetMissingError.
    """
    if name not in _LOADERS:
        raise ValueError(f"corpus name={name!r} is not known; use one of {CORPORA}")
    return _LOADERS[name]()


_TOKEN_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TOKEN_CACHE_SIZE = 8


def tokenize(tokenizer, text: str, cache: bool = True) -> torch.LongTensor:
    """Token ids of ``text`` as one 1-D LongTensor, with no special tokens (no BOS/EOS) added.

    With ``cache``, results are remembered in memory (last 8) per tokenizer class, ``name_or_path`` and
    vocabulary size and the exact text; tokenizers built in memory (empty ``name_or_path``) are never
    cached. A copy is returned, so callers may modify it freely.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}; pass e.g. corpus.test")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer={tokenizer!r} is not callable; pass a transformers tokenizer, e.g. "
                        "AutoTokenizer.from_pretrained(asset_path('smollm2-135m'))")
    path = getattr(tokenizer, "name_or_path", "")
    key = (type(tokenizer).__name__, path, len(tokenizer), text) if cache and path else None
    if key is not None and key in _TOKEN_CACHE:
        _TOKEN_CACHE.move_to_end(key)
        return _TOKEN_CACHE[key].clone()
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(encoded, dtype=torch.long)  # (N,)
    if key is not None:
        _TOKEN_CACHE[key] = ids.clone()
        while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE.popitem(last=False)
    return ids


def calibration_batches(ids: torch.LongTensor, n: int, seq_len: int, seed: int = 0) -> torch.LongTensor:
    """``n`` windows of ``seq_len`` consecutive ids, started at offsets drawn with ``seed``: (n, seq_len).

    The offsets are uniform over every valid start (``0 … len(ids) - seq_len``), drawn from a private
    ``torch.Generator``, so the same seed gives the same batches and no global random state is touched.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a 1-D tensor of token ids, got {shape}; use tokenize(tokenizer, text)"
                         " or flatten it with ids.reshape(-1)")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids has dtype {ids.dtype}; token ids must be integers (torch.long)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer ≥ 1 (the number of calibration windows)")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} must be an integer ≥ 2 (tokens per window)")
    if seq_len > len(ids):
        raise ValueError(f"seq_len={seq_len} is longer than the {len(ids)} ids available; use a shorter "
                         "seq_len or a longer split (e.g. the train split)")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=generator)  # (n,)
    positions = starts[:, None] + torch.arange(seq_len)  # (n, seq_len)
    return ids[positions.to(ids.device)].long()  # (n, seq_len)
