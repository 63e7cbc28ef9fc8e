"""lm-eval (EleutherAI's evaluation harness, Gao et al. 2023) on local task files, and our own evaluation of the
same requests to check it.

The harness's stock tasks download their data from the Hugging Face hub. A task is also a YAML file: this
module writes two into a folder, beside their JSONL data — a rolling-loglikelihood task over text documents
(word and byte perplexity, bits per byte) and a multiple-choice task (accuracy) — and runs them with
``lm_eval.simple_evaluate`` on a model already in memory (``HFLM(pretrained=model)``), e.g. one that
``effref`` has just quantized. ``our_scores`` computes the same two numbers from the definitions:
  bits/byte = Σ_docs Σ_t −log p(x_t | x_<t) / (ln 2 · Σ_docs bytes),  each document scored after lm-eval's
  prefix token (the tokenizer's BOS, else EOS), as one window when it fits the context;
  accuracy = share of items whose highest Σ log p(continuation | context) is the labelled choice, the
  continuation being " " + choice, tokenized as lm-eval does (context and continuation encoded together).
Glossary: doc = one JSONL line · rolling loglikelihood = the log-probability of a whole document.
Left out: the hub tasks themselves (offline here), length-normalised accuracy (acc_norm), few-shot prompts.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

PPL_TASK = "effref_austen_ppl"
MC_TASK = "effref_austen_mc"


def make_tasks(text: str, folder: str | Path, n_docs: int = 8, doc_words: int = 60, n_items: int = 24,
               context_words: int = 24, choice_words: int = 6, n_choices: int = 4, seed: int = 0) -> Path:
    """Write both task YAMLs and their JSONL data into ``folder`` (made from ``text``); return the folder.

    Documents are ``n_docs`` runs of ``doc_words`` words from evenly spaced places; a multiple-choice item is a
    context of ``context_words`` words, the ``choice_words`` words that follow it (the answer), and
    ``n_choices - 1`` runs of the same length from elsewhere in the text (the distractors), shuffled."""
    words = text.split()
    need = max(n_docs * doc_words, n_items * (context_words + choice_words)) * 2
    if len(words) < need:
        raise ValueError(f"text has {len(words)} words; these settings need at least {need}")
    if n_choices < 2:
        raise ValueError(f"n_choices={n_choices} must be >= 2 (an answer and a distractor)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    step = len(words) // n_docs
    docs = [{"text": " ".join(words[i * step:i * step + doc_words])} for i in range(n_docs)]
    rng = random.Random(seed)
    items = []
    for _ in range(n_items):
        start = rng.randrange(0, len(words) - context_words - choice_words)
        answer = " ".join(words[start + context_words:start + context_words + choice_words])
        others = [" ".join(words[s:s + choice_words]) for s in
                  (rng.randrange(0, len(words) - choice_words) for _ in range(n_choices - 1))]
        choices = others + [answer]
        rng.shuffle(choices)
        items.append({"context": " ".join(words[start:start + context_words]), "choices": choices,
                      "label": choices.index(answer)})
    for name, rows in (("docs.jsonl", docs), ("mc.jsonl", items)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\ntest_split: test\n"
    (folder / f"{PPL_TASK}.yaml").write_text(
        f"task: {PPL_TASK}\n" + common.format(file=folder / "docs.jsonl")
        + "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        + "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (folder / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\n" + common.format(file=folder / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        + "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    return folder


def harness_scores(model, tokenizer, folder: str | Path, batch_size: int = 8) -> dict[str, float]:
    """lm-eval's ``simple_evaluate`` of the in-memory ``model`` on the tasks of ``make_tasks``:
    ``{"bits_per_byte", "word_perplexity", "byte_perplexity", "acc"}``."""
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    out = lm_eval.simple_evaluate(model=lm, tasks=[PPL_TASK, MC_TASK], task_manager=TaskManager(
        include_path=str(folder)), verbosity="ERROR", log_samples=False)["results"]
    ppl, mc = out[PPL_TASK], out[MC_TASK]
    return {"bits_per_byte": ppl["bits_per_byte,none"], "word_perplexity": ppl["word_perplexity,none"],
            "byte_perplexity": ppl["byte_perplexity,none"], "acc": mc["acc,none"]}


def _logprob(model, ids: list[int], start: int) -> float:
    """Σ_{t >= start} log p(ids[t] | ids[:t]) under ``model``."""
    x = torch.tensor([ids], device=model.device)  # (1, T)
    with torch.no_grad():
        logp = model(x).logits.float().log_softmax(-1)[0]  # (T, V)
    targets = x[0, start:]  # (T - start,)
    return logp[start - 1:-1].gather(-1, targets[:, None]).sum().item()


def our_scores(model, tokenizer, folder: str | Path) -> dict[str, float]:
    """bits per byte and accuracy of ``model`` on the tasks of ``make_tasks``, from the definitions above."""
    folder = Path(folder)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    docs = [json.loads(line)["text"] for line in (folder / "docs.jsonl").read_text().splitlines()]
    nll = -sum(_logprob(model, [prefix] + tokenizer.encode(d, add_special_tokens=False), 1) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    items = [json.loads(line) for line in (folder / "mc.jsonl").read_text().splitlines()]
    correct = 0
    for item in items:
        context = tokenizer.encode(item["context"], add_special_tokens=False)
        scores = []
        for choice in item["choices"]:
            whole = tokenizer.encode(item["context"] + " " + choice, add_special_tokens=False)
            cut = len(context)
            if whole[:cut] != context:  # a merge across the boundary: lm-eval keeps the context's own tokens
                cut = len(whole) - len(tokenizer.encode(" " + choice, add_special_tokens=False))
            scores.append(_logprob(model, whole, cut))
        correct += max(range(len(scores)), key=scores.__getitem__) == item["label"]
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "acc": correct / len(items)}
