"""The fine-tuning bench: small downstream tasks and one training loop shared by every fine-tuning chapter.

Tasks — classification with the language model itself as the classifier. Each text (whitespace collapsed, the
first 2 % skipped so title pages never appear) is cut by characters into a training part (the first 80 %) and a
test part (the rest), so train and test passages never overlap. Passages start at seeded random character
offsets (snapped to a word start) and keep their first ``passage_tokens`` tokens. Each example is
``passage + suffix`` and its label is the next token: the first token of the class's verbaliser. The predicted
class is the verbaliser with the highest log-likelihood at the last position, so accuracy is measured with no
new head. Training minimises the cross-entropy of the label token normalised over the C verbalisers
(``task_loss(..., over="vocab")`` is the plain next-token loss over the whole vocabulary).

- ``source_task``: "what kind of text is this?" — fiction (Austen), the Python manual, Python code, a license
  (four classes, chance 1/4), prompt ``"\\nThis text is from a"``, verbalisers " novel", " manual", " program",
  " license". SmolLM2-135M starts above chance and learns it in a few dozen steps: the chapters' bench.
- ``novel_task``: "which Austen novel is this passage from?" (six classes, verbalisers the short titles " Emma",
  " Persuasion", " Pride", " Sense", " Mansfield", " Northanger"). Much harder: SmolLM2-135M starts at chance,
  and a logistic-regression probe on its last hidden state, fitted to 192 passages of 40 tokens, scored about 0.4
  on held-out passages when we tried it (a one-off measurement, not part of the book).

Training loop — ``train(model, task, steps, lr, batch_size, optimizer)`` runs ``steps`` optimiser steps on
batches drawn (seeded) from the training passages, over the parameters that have ``requires_grad``. It
reports the losses, tokens per second, the peak memory of the first step (``effref.eval.track_memory``:
on CPU the tensors created during forward, backward and the optimizer's first step — activations,
gradients and optimizer state — on top of the model's own bytes), wall time and the trainable parameters.
Hooks let a method act each step: ``before_step`` (DyLoRA samples a rank), ``regulariser`` (a loss term,
AdaLoRA's orthogonality penalty), ``after_update`` (AdaLoRA's budget reallocation). A forward-only method
(MeZO) passes ``update(model, loss_fn, step) -> loss``, which replaces backward and the optimiser step: the
batches, timing and memory measurement stay the same, so every method is measured the same way.

Glossary: C classes · T = passage_tokens + suffix tokens · B batch size · verbaliser = label token of a class.
Left out: multi-token verbalisers (only the first token of a title is scored), padding (every example
has the same length), learning-rate schedules, gradient accumulation, mixed precision.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from effref.memory import MemoryReport, model_size_bytes, parameter_count, track_memory
from effref.models.calls import is_transformers_model, model_device
from effref.runtime import progress_bar

# file stem of the janeaustenr asset -> (title, verbaliser)
NOVELS = {
    "emma": ("Emma", " Emma"),
    "persuasion": ("Persuasion", " Persuasion"),
    "prideprejudice": ("Pride and Prejudice", " Pride"),
    "sensesensibility": ("Sense and Sensibility", " Sense"),
    "mansfieldpark": ("Mansfield Park", " Mansfield"),
    "northangerabbey": ("Northanger Abbey", " Northanger"),
}
# corpus -> (class name, verbaliser) of source_task
SOURCES = {
    "austen": ("fiction", " novel"),
    "pydoc": ("Python manual", " manual"),
    "stdlib": ("Python code", " program"),
    "licenses": ("license", " license"),
}


@dataclass
class NovelTask:
    """Tokenised passages with their class labels; every example has the same length T."""

    classes: tuple[str, ...]  # titles, in label order
    label_ids: torch.Tensor  # (C,) the verbaliser token of each class
    train_ids: torch.Tensor  # (n_train, T)
    train_labels: torch.Tensor  # (n_train,) in 0..C-1
    test_ids: torch.Tensor  # (n_test, T)
    test_labels: torch.Tensor  # (n_test,)
    passage_tokens: int
    suffix: str

    def describe(self) -> str:
        return (f"{len(self.classes)}-way classification ({', '.join(self.classes)}): {len(self.train_ids)} train / "
                f"{len(self.test_ids)} test passages of {self.passage_tokens} tokens + {self.suffix!r} "
                f"(T = {self.train_ids.shape[1]}); train from the first 80% of each text, test from the rest")


def _austen_texts() -> dict[str, str]:
    from effref.assets import require

    folder = require("austen")
    return {stem: (folder / f"{stem}.txt").read_text(encoding="utf-8") for stem in NOVELS}


def _passages(tokenizer, text: str, n: int, length: int, generator: torch.Generator) -> list[list[int]]:
    """``n`` passages of ``length`` tokens from ``text`` at seeded word-aligned character offsets."""
    span = 12 * length  # characters: comfortably more than ``length`` tokens of English prose
    if len(text) < span + 1:
        raise ValueError(f"a text of {len(text)} characters is too short for {length}-token passages")
    out = []
    for start in torch.randint(0, len(text) - span, (n,), generator=generator).tolist():
        start = text.find(" ", start) + 1  # snap to the next word start
        ids = tokenizer(text[start:start + span], add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            raise ValueError(f"only {len(ids)} tokens in {span} characters; use a shorter passage_tokens")
        out.append(ids[:length])
    return out


def novel_task(tokenizer, passage_tokens: int = 48, train_per_class: int = 32, test_per_class: int = 16,
               seed: int = 0, suffix: str = "\nNovel:", texts: dict[str, str] | None = None,
               verbalisers: dict[str, str] | None = None) -> NovelTask:
    """Build the novel-classification task (see the module docstring); deterministic for a given seed.

    ``texts`` ({name: text}) and ``verbalisers`` ({name: string}) replace the Austen novels and their short
    titles (tests use them with tiny models); each verbaliser's first token must differ from the others'.
    """
    if passage_tokens < 4 or train_per_class < 1 or test_per_class < 1:
        raise ValueError(f"passage_tokens={passage_tokens}, train_per_class={train_per_class}, test_per_class="
                         f"{test_per_class}: need passage_tokens >= 4 and at least 1 passage per class")
    texts = _austen_texts() if texts is None else texts
    verbalisers = verbalisers or {name: NOVELS[name][1] for name in texts}
    if set(verbalisers) != set(texts):
        raise ValueError(f"verbalisers {sorted(verbalisers)} must name the same classes as texts {sorted(texts)}")
    names = sorted(texts)
    label_ids = [tokenizer(verbalisers[n], add_special_tokens=False)["input_ids"][0] for n in names]
    if len(set(label_ids)) != len(label_ids):
        raise ValueError(f"verbalisers {[verbalisers[n] for n in names]} share a first token ({label_ids}); "
                         "choose strings whose first tokens differ")
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    splits = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(names):
        text = " ".join(texts[name].split())  # collapse line breaks and runs of spaces
        text = text[len(text) // 50:]  # skip the title page
        cut = int(0.8 * len(text))
        for split, part, n in (("train", text[:cut], train_per_class), ("test", text[cut:], test_per_class)):
            for ids in _passages(tokenizer, part, n, passage_tokens, generator):
                splits[split][0].append(ids + suffix_ids)
                splits[split][1].append(label)
    tensors = {}
    for split, (seqs, labels) in splits.items():
        order = torch.randperm(len(seqs), generator=generator)  # mix the classes
        tensors[split] = (torch.tensor(seqs)[order], torch.tensor(labels)[order])
    titles = tuple(NOVELS[n][0] if n in NOVELS else n for n in names)
    return NovelTask(titles, torch.tensor(label_ids), *tensors["train"], *tensors["test"], passage_tokens, suffix)


def source_task(tokenizer, passage_tokens: int = 24, train_per_class: int = 48, test_per_class: int = 48,
                seed: int = 0) -> NovelTask:
    """"What kind of text is this?": four classes (fiction, Python manual, Python code, license), the learnable bench.

    The same construction as ``novel_task`` over the texts of ``SOURCES``, each the documents of one corpus joined
    in their fixed order (Austen's six novels; ``effref.data``'s ``pydoc``, ``stdlib`` and ``licenses``), so the
    test passages come from the last fifth of each: documents (a novel, modules, topics, licenses) that no
    training passage was drawn from. The prompt asks for the kind of text and the verbalisers name it, so the
    model starts above chance (1/4) and a few dozen steps make it a good classifier.
    """
    from effref.data import load_corpus

    def whole(name: str) -> str:  # every document of the corpus, in its fixed order
        if name == "austen":
            return "\n\n".join(_austen_texts().values())
        corpus = load_corpus(name)
        return f"{corpus.train}\n\n{corpus.validation}\n\n{corpus.test}"

    texts = {name: whole(name) for name in SOURCES}
    task = novel_task(tokenizer, passage_tokens, train_per_class, test_per_class, seed=seed,
                      suffix="\nThis text is from a", texts=texts,
                      verbalisers={name: verbaliser for name, (_, verbaliser) in SOURCES.items()})
    return replace(task, classes=tuple(SOURCES[name][0] for name in sorted(texts)))


def toy_task(seed: int = 0, passage_tokens: int = 24, train_per_class: int = 16, test_per_class: int = 8) -> NovelTask:
    """A six-class stand-in for unit tests on tiny random models (vocabulary 256: one token per byte).

    Class c's "novel" is 3,000 random words over its own three letters; verbalisers are the bytes "A".."F".
    """
    import random

    rng = random.Random(seed)
    alphabets = ["abc", "def", "ghi", "jkl", "mno", "pqr"]
    texts = {f"n{i}": " ".join("".join(rng.choice(a) for _ in range(rng.randint(2, 6))) for _ in range(3000))
             for i, a in enumerate(alphabets)}
    verbalisers = {f"n{i}": chr(ord("A") + i) for i in range(6)}
    return novel_task(byte_tokenizer, passage_tokens, train_per_class, test_per_class, seed=seed, suffix="\n:",
                      texts=texts, verbalisers=verbalisers)


def byte_tokenizer(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
    """UTF-8 bytes as token ids, with the call signature of a transformers tokenizer."""
    return {"input_ids": list(text.encode("utf-8"))}


def last_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits after the last position, (B, V), computing the LM head only there when possible.

    ``ids`` are token ids (B, T), or hidden states (B, T, d) for a model made by ``split_top_layers``.
    """
    if ids.is_floating_point():
        out = model(inputs_embeds=ids, use_cache=False, logits_to_keep=1)
    elif is_transformers_model(model) or getattr(model, "supports_logits_to_keep", False):
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    else:
        out = model(ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, T or 1, V)
    return logits[:, -1]  # (B, V)


def task_loss(model: nn.Module, task: NovelTask, ids: torch.Tensor, labels: torch.Tensor,
              over: str = "classes") -> torch.Tensor:
    """Cross-entropy of the label token, normalised over the C verbalisers (``over="classes"``, the default)
    or over the whole vocabulary (``over="vocab"``, plain next-token loss)."""
    logits = last_logits(model, ids).float()  # (B, V)
    label_ids, labels = task.label_ids.to(logits.device), labels.to(logits.device)
    if over == "classes":
        return F.cross_entropy(logits[:, label_ids], labels)  # (B, C) scores of the verbalisers
    if over == "vocab":
        return F.cross_entropy(logits, label_ids[labels])
    raise ValueError(f"over={over!r} must be 'classes' or 'vocab'")


@torch.no_grad()
def class_scores(model: nn.Module, task: NovelTask, split: str = "test",
                 batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The verbaliser logits of every passage of ``split`` and the labels: ((n, C) float, (n,) long), on CPU."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    ids, labels = (task.test_ids, task.test_labels) if split == "test" else (task.train_ids, task.train_labels)
    device, was_training = model_device(model), model.training
    model.eval()
    scores = []
    try:
        for i in range(0, len(ids), batch_size):
            logits = last_logits(model, ids[i:i + batch_size].to(device))  # (b, V)
            scores.append(logits[:, task.label_ids.to(device)].float().cpu())  # (b, C)
    finally:
        model.train(was_training)
    return torch.cat(scores), labels


def evaluate(model: nn.Module, task: NovelTask, batch_size: int = 16, split: str = "test") -> float:
    """Accuracy: the class whose verbaliser token has the highest logit at the last position."""
    scores, labels = class_scores(model, task, split, batch_size)
    return (scores.argmax(-1) == labels).float().mean().item()


def accuracy_se(accuracy: float, n: int) -> float:
    """The binomial standard error √(p(1 − p)/n) of an accuracy p measured on n examples: how far apart two
    accuracies must lie (two of these, say) before a comparison says more than which passages were drawn.

    Never below 1/n, the resolution of n examples, so a perfect (or zero) score has a finite margin over others."""
    if not 0 <= accuracy <= 1 or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"accuracy={accuracy!r}, n={n!r}: need 0 <= accuracy <= 1 and a positive integer n")
    return max(math.sqrt(accuracy * (1 - accuracy) / n), 1 / n)


@torch.no_grad()
def split_top_layers(model: nn.Module, task: NovelTask, n_top: int, batch_size: int = 16,
                     progress: bool = True) -> tuple[nn.Module, NovelTask]:
    """Cut a transformers LLaMA after layer L − n_top: (a model of the top ``n_top`` layers, the task as hidden states).

    The bottom layers are frozen in every method of a fine-tuning comparison that only adapts the top
    layers, so their outputs are computed once here and the training loop runs (and back-propagates)
    through the top layers only. The returned model is a ``LlamaForCausalLM`` of ``n_top`` layers: a copy of
    the top layers (a method may wrap them without touching ``model``), sharing the final norm and LM head,
    fed the cached hidden states as ``inputs_embeds``; its logits equal the full model's (a test checks
    this). Every example's hidden
    states are (T, d) floats, so the task's ids become (n, T, d).
    """
    from transformers import LlamaForCausalLM

    if not is_transformers_model(model) or not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise TypeError(f"split_top_layers needs a transformers LlamaForCausalLM, got {type(model).__name__}")
    n_layers = len(model.model.layers)
    if not 1 <= n_top <= n_layers:
        raise ValueError(f"n_top={n_top} must be in [1, {n_layers}] (the model's layers)")
    inner, device = model.model, model_device(model)
    saved = inner.layers, inner.norm
    inner.layers, inner.norm = nn.ModuleList(saved[0][:n_layers - n_top]), nn.Identity()
    try:
        hidden = {}
        for split, ids in (("train", task.train_ids), ("test", task.test_ids)):
            chunks = []
            bar = progress_bar(range(0, len(ids), batch_size), desc=f"bottom {n_layers - n_top} layers, {split}",
                               disable=not progress)
            for i in bar:
                chunks.append(inner(input_ids=ids[i:i + batch_size].to(device), use_cache=False).last_hidden_state)
            hidden[split] = torch.cat(chunks)  # (n, T, d)
    finally:
        inner.layers, inner.norm = saved
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = n_top
    top = LlamaForCausalLM(config).to(device=device, dtype=next(model.parameters()).dtype)
    top.model.layers = copy.deepcopy(nn.ModuleList(saved[0][n_layers - n_top:]))  # a copy: PEFT wraps them
    for index, layer in enumerate(top.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index  # its KV-cache slot in the smaller model
    top.model.norm, top.model.rotary_emb = inner.norm, inner.rotary_emb
    top.model.embed_tokens, top.lm_head = inner.embed_tokens, model.lm_head
    top.eval()
    cached = NovelTask(task.classes, task.label_ids, hidden["train"], task.train_labels, hidden["test"],
                       task.test_labels, task.passage_tokens, task.suffix)
    return top, cached


@dataclass
class TrainResult:
    losses: list[float]
    tokens_per_s: float  # training tokens (B·T per step) per second, steps after the first
    peak_memory: MemoryReport  # of the first step, model bytes included
    wall_s: float
    trainable_params: int
    steps: int
    batch_size: int
    notes: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.steps} steps × batch {self.batch_size}: loss {self.losses[0]:.3f} → {self.losses[-1]:.3f}, "
                f"{self.tokens_per_s:,.0f} tok/s, peak {self.peak_memory.peak_bytes / 2**20:,.0f} MiB, "
                f"{self.trainable_params:,} trainable parameters, {self.wall_s:.1f} s")


OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
UpdateRule = Callable[[nn.Module, Callable[[], torch.Tensor], int], float]  # (model, loss_fn, step) -> loss


def _make_optimizer(optimizer: str | OptimizerFactory, params: list[nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if callable(optimizer):
        return optimizer(params)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={optimizer!r} is not known; use 'adamw', 'sgd' or a callable(params) -> Optimizer")


def train(model: nn.Module, task: NovelTask, steps: int, lr: float, batch_size: int = 8,
          optimizer: str | OptimizerFactory = "adamw", weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
          seed: int = 0, regulariser: Callable[[nn.Module], torch.Tensor] | None = None,
          before_step: Callable[[int], None] | None = None, after_update: Callable[[int], None] | None = None,
          update: UpdateRule | None = None, progress: bool = True, desc: str = "train") -> TrainResult:
    """Fine-tune the parameters of ``model`` that require grad for ``steps`` steps (see module docstring)."""
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, lr={lr}: need steps >= 1, batch_size >= 1, lr > 0")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True; apply a PEFT method or unfreeze layers")
    if update is not None and regulariser is not None:
        raise ValueError("regulariser= needs backpropagation; a forward-only update= cannot add it")
    device = model_device(model)
    opt = _make_optimizer(optimizer, params, lr, weight_decay) if update is None else None
    generator = torch.Generator().manual_seed(seed)
    n, T = task.train_ids.shape[:2]
    epochs = -(-steps * batch_size // n)  # ceil: each epoch visits every training passage once, reshuffled
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])  # (epochs·n,)
    losses: list[float] = []
    timed_s, timed_steps = 0.0, 0
    memory = None
    was_training = model.training
    model.train()
    start_wall = time.perf_counter()
    try:
        for step in progress_bar(range(steps), desc=desc, unit="step", disable=not progress):
            batch = order[step * batch_size:(step + 1) * batch_size]  # (B,)
            ids, labels = task.train_ids[batch].to(device), task.train_labels[batch]
            tick = time.perf_counter()
            if step == 0:  # measure memory on the first step, which also creates the optimizer state
                with track_memory(device, baseline_bytes=model_size_bytes(model)) as memory:
                    loss = _step(model, task, opt, params, ids, labels, step, max_grad_norm, regulariser,
                                 before_step, after_update, update)
            else:
                loss = _step(model, task, opt, params, ids, labels, step, max_grad_norm, regulariser,
                             before_step, after_update, update)
                timed_s, timed_steps = timed_s + time.perf_counter() - tick, timed_steps + 1
            if step == 0 and steps == 1:
                timed_s, timed_steps = time.perf_counter() - tick, 1
            losses.append(loss)
    finally:
        model.train(was_training)
    return TrainResult(losses=losses, tokens_per_s=timed_steps * batch_size * T / max(timed_s, 1e-9),
                       peak_memory=memory, wall_s=time.perf_counter() - start_wall,
                       trainable_params=parameter_count(model, trainable_only=True), steps=steps,
                       batch_size=batch_size)


def _step(model, task, opt, params, ids, labels, step, max_grad_norm, regulariser, before_step,
          after_update, update) -> float:
    if before_step is not None:
        before_step(step)
    if update is not None:  # forward-only: the rule evaluates the loss itself, as often as it needs
        value = float(update(model, lambda: task_loss(model, task, ids, labels), step))
        if after_update is not None:
            after_update(step)
    else:
        loss = task_loss(model, task, ids, labels)
        total = loss + regulariser(model) if regulariser is not None else loss
        total.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        if after_update is not None:  # before zero_grad: AdaLoRA's importance scores read the gradients
            after_update(step)
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"loss became {value} at step {step}; lower the learning rate")
    return value
