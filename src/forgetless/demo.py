"""`forgetless demo`: fine-tune the embedded SmolLM2-135M-Instruct on a made-up task, merge, and show the trade-off.

Until the LLaVA testbed lands, this is the end-to-end demo. Everything runs on CPU from files already on disk:

1. the embedded model is exported once as a Hugging Face folder (``forgetless.embedded.export_smollm2``);
2. ``make_finetuned`` teaches it the *Zorblax code* — a seeded, invented lexicon (8 colours, 8 animals → made-up
   code words; the code puts the animal first) — with a few dozen real AdamW steps on chat-formatted
   ``Translate into Zorblax: red fox`` → ``<fox-code> <red-code>``, loss on the answer tokens only, training only
   the last third of the decoder layers (layers 20–29 of 30); everything else stays bit-identical;
3. ``forgetless.merge`` merges the base and the fine-tuned copy with several methods, and ``forgetless cgm``'s
   chain computes the Fisher statistics (general at θ₀ on the general questions, task at θ_ft on the training
   phrases) and merges with CGM and CGM†;
4. every model is scored on held-out Zorblax phrases (colour–animal pairs never seen in training: exact match of
   the greedy answer, computed exactly by teacher forcing, and answer loss) and on 40 general-knowledge questions
   written below (answer loss, and 3-way multiple choice by answer log-likelihood) — the "general" score is what
   the model knew before fine-tuning and should not forget.

A second run reuses the fine-tuned copy when its recipe hash (base weights, task, steps, seed, layers,
hyper-parameters) matches, and every evaluation whose model weights (sha256) and evaluation set are unchanged; only
the merges run again. Results are printed as a table and written to ``<workdir>/results.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ForgetlessError

DEFAULT_WORKDIR = Path("runs/demo")
DEFAULT_STEPS = 40
QUICK_STEPS = 24
SEED = 0
LR = 3e-4
BATCH_SIZE = 8
THREADS = 2
TASK_VERSION = 1  # bump when the task generator changes: it invalidates cached fine-tunes
EVAL_VERSION = 1  # bump when the evaluation changes: it invalidates cached scores
SYSTEM = "Be brief."

# ------------------------------------------------------------------------------------------------ the task
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
ANIMALS = ("cat", "dog", "fox", "horse", "bird", "fish", "bear", "wolf")
_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = ("", "", "k", "n", "x", "sh", "r")


@dataclass(frozen=True)
class Example:
    prompt: str  # the user message
    answer: str  # the assistant's reply
    eos: bool = True  # the answer ends the turn: `encode` appends (and labels) the end-of-turn token


@dataclass(frozen=True)
class ZorblaxTask:
    lexicon: dict[str, str]  # English word -> code word
    train: list[Example]
    heldout: list[Example]  # colour-animal pairs never seen in training; every word is seen in training


def _code_word(rng: random.Random) -> str:
    syllables = rng.choice((2, 2, 3))
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)


def zorblax_task(seed: int = SEED) -> ZorblaxTask:
    """The Zorblax code: 16 invented code words, 64 colour-animal phrases, 48 for training and 16 held out.

    The held-out pairs form two shifted diagonals of the colour x animal grid (after a seeded shuffle of both), so
    every colour and every animal occurs six times in training and twice in the held-out set.
    """
    rng = random.Random(f"zorblax-{seed}")
    lexicon: dict[str, str] = {}
    used: set[str] = set()
    for word in COLOURS + ANIMALS:
        code = _code_word(rng)
        while code in used:
            code = _code_word(rng)
        used.add(code)
        lexicon[word] = code
    colours, animals = list(COLOURS), list(ANIMALS)
    rng.shuffle(colours)
    rng.shuffle(animals)
    n = len(colours)
    held = {(colours[i], animals[(i + k) % n]) for i in range(n) for k in (0, 3)}

    def example(c: str, a: str) -> Example:
        return Example(f"Translate into Zorblax: {c} {a}", f"{lexicon[a]} {lexicon[c]}")

    pairs = [(c, a) for c in COLOURS for a in ANIMALS]
    train = [example(c, a) for c, a in pairs if (c, a) not in held]
    heldout = [example(c, a) for c, a in pairs if (c, a) in held]
    rng.shuffle(train)
    return ZorblaxTask(lexicon, train, heldout)


# Retained knowledge: (question, answer sentence with a slot, right answer, two wrong answers). Answers are full
# sentences in the base model's own style, so their loss measures knowledge, not answer format; the base model's
# scores are the reference the merges should keep.
GENERAL: tuple[tuple[str, str, str, tuple[str, str]], ...] = (
    ("What is the capital of France?", "The capital of France is {}.", "Paris", ("London", "Madrid")),
    ("What is the capital of Japan?", "The capital of Japan is {}.", "Tokyo", ("Beijing", "Seoul")),
    ("What is the capital of Italy?", "The capital of Italy is {}.", "Rome", ("Paris", "Berlin")),
    ("What is the capital of Germany?", "The capital of Germany is {}.", "Berlin", ("Vienna", "Madrid")),
    ("What is the capital of Spain?", "The capital of Spain is {}.", "Madrid", ("Lisbon", "Rome")),
    ("What is the capital of the United Kingdom?", "The capital of the United Kingdom is {}.", "London",
     ("Dublin", "Paris")),
    ("What is the capital of Canada?", "The capital of Canada is {}.", "Ottawa", ("Toronto", "Vancouver")),
    ("What is the capital of Egypt?", "The capital of Egypt is {}.", "Cairo", ("Nairobi", "Lagos")),
    ("What is the capital of Russia?", "The capital of Russia is {}.", "Moscow", ("Warsaw", "Kyiv")),
    ("What is the capital of China?", "The capital of China is {}.", "Beijing", ("Tokyo", "Shanghai")),
    ("What is the largest planet in our solar system?", "The largest planet in our solar system is {}.",
     "Jupiter", ("Mars", "Mercury")),
    ("Which planet is known as the Red Planet?", "The planet known as the Red Planet is {}.", "Mars",
     ("Venus", "Saturn")),
    ("What is the star at the centre of our solar system?", "The star at the centre of our solar system is {}.",
     "the Sun", ("the Moon", "Sirius")),
    ("What gas do plants absorb from the air for photosynthesis?",
     "Plants absorb {} from the air for photosynthesis.", "carbon dioxide", ("oxygen", "helium")),
    ("What is the chemical formula of water?", "The chemical formula of water is {}.", "H2O", ("CO2", "NaCl")),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is {}.", "Au", ("Ag", "Fe")),
    ("How many legs does a spider have?", "A spider has {} legs.", "eight", ("six", "four")),
    ("How many days are in a week?", "There are {} days in a week.", "seven", ("five", "ten")),
    ("At what temperature does water boil at sea level?", "Water boils at {} degrees Celsius at sea level.",
     "100", ("50", "0")),
    ("At what temperature does water freeze?", "Water freezes at {} degrees Celsius.", "0", ("100", "37")),
    ("What is 2 plus 2?", "2 plus 2 equals {}.", "4", ("5", "3")),
    ("What is 7 times 8?", "7 times 8 equals {}.", "56", ("54", "64")),
    ("What is 10 minus 3?", "10 minus 3 equals {}.", "7", ("6", "13")),
    ("What is 9 times 9?", "9 times 9 equals {}.", "81", ("72", "99")),
    ("What is 100 divided by 4?", "100 divided by 4 equals {}.", "25", ("20", "40")),
    ("What is 15 plus 27?", "15 plus 27 equals {}.", "42", ("32", "52")),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by {}.", "William Shakespeare",
     ("Charles Dickens", "Mark Twain")),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by {}.", "Leonardo da Vinci",
     ("Pablo Picasso", "Vincent van Gogh")),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the {} Ocean.", "Pacific",
     ("Atlantic", "Indian")),
    ("What is the longest river in Africa?", "The longest river in Africa is the {}.", "Nile",
     ("Amazon", "Thames")),
    ("What is the tallest mountain in the world?", "The tallest mountain in the world is {}.", "Mount Everest",
     ("Mount Kilimanjaro", "Mont Blanc")),
    ("Which organ pumps blood through the human body?", "The {} pumps blood through the human body.", "heart",
     ("liver", "stomach")),
    ("What do bees make?", "Bees make {}.", "honey", ("milk", "silk")),
    ("What is the hardest natural substance?", "The hardest natural substance is {}.", "diamond",
     ("gold", "glass")),
    ("How many continents are there on Earth?", "There are {} continents on Earth.", "seven", ("five", "nine")),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives {}.", "green",
     ("purple", "orange")),
    ("What is the main language spoken in Brazil?", "The main language spoken in Brazil is {}.", "Portuguese",
     ("Spanish", "French")),
    ("Which animal is known as the king of the jungle?", "The {} is known as the king of the jungle.", "lion",
     ("elephant", "zebra")),
    ("What is the currency of Japan?", "The currency of Japan is the {}.", "yen", ("euro", "dollar")),
    ("How many hours are in a day?", "There are {} hours in a day.", "24", ("12", "60")),
)


# ------------------------------------------------------------------------------------------------ encoding
def encode(tok, ex: Example) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat turn; labels are -100 on every prompt token, the answer ids elsewhere.

    The prompt (system + user + the assistant header) and the answer are tokenized separately and concatenated,
    so the boundary is exact. A task answer ends with the end-of-turn token, so a model must also learn to stop.
    """
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ex.prompt}]
    prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    answer = tok(ex.answer, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if ex.eos else [])
    return prompt + answer, [-100] * len(prompt) + answer


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_scores(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-token log-probabilities of the labelled (answer) tokens, and per-sequence sums.

    Logits are computed only at answer positions (the vocabulary projection dominates otherwise). Returns
    ``token_logp`` (N,), ``seq_logp`` (B,), ``seq_tokens`` (B,) and ``seq_exact`` (B,): whether the argmax at every
    answer position is the answer token, i.e. whether greedy decoding reproduces the answer exactly.
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    target = batch["labels"][:, 1:]
    where = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][where]).float()
    tgt = target[where]
    token_logp = logits.log_softmax(-1).gather(-1, tgt[:, None])[:, 0]
    seq = where.nonzero()[:, 0]
    b = target.shape[0]
    seq_logp = torch.zeros(b).index_add_(0, seq, token_logp)
    seq_tokens = torch.zeros(b).index_add_(0, seq, torch.ones_like(token_logp))
    wrong = torch.zeros(b).index_add_(0, seq, (logits.argmax(-1) != tgt).float())
    return {"token_logp": token_logp, "seq_logp": seq_logp, "seq_tokens": seq_tokens, "seq_exact": wrong == 0}


# ------------------------------------------------------------------------------------------------ fine-tuning
def last_third(num_layers: int) -> list[int]:
    """The default trained layers: the last third of the decoder (20..29 of 30), at least one layer."""
    k = max(1, num_layers // 3)
    return list(range(num_layers - k, num_layers))


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _trainable(model, layers: Sequence[int]) -> list[str]:
    chosen = set(layers)
    names = []
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        p.requires_grad_(bool(m) and int(m.group(1)) in chosen)
        if p.requires_grad:
            names.append(name)
    return names


def _recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def finetune_recipe(base_dir: Path, *, steps: int, seed: int, layers: Sequence[int], lr: float,
                    batch_size: int) -> dict:
    """Everything the fine-tuned weights depend on; its hash keys the cache."""
    from .checkpoint.reader import CheckpointReader

    with CheckpointReader(base_dir) as r:
        base_fp = r.weights_fingerprint()
    return {"base": base_fp, "task": f"zorblax-v{TASK_VERSION}", "system": SYSTEM, "steps": steps, "seed": seed,
            "layers": list(layers), "optimizer": "AdamW", "lr": lr, "batch_size": batch_size,
            "dtype": "float32", "torch": torch.__version__.split("+")[0]}


def make_finetuned(base_dir: str | os.PathLike, out_dir: str | os.PathLike, *, steps: int = DEFAULT_STEPS,
                   seed: int = SEED, layers: Sequence[int] | None = None, lr: float = LR,
                   batch_size: int = BATCH_SIZE, threads: int | None = THREADS, log=print) -> Path:
    """Fine-tune `layers` (default: the last third of the decoder) of the model in `base_dir` on the Zorblax task.

    Real AdamW steps in float32 on CPU, loss on the answer tokens only; every other parameter keeps its exact
    value. The copy is written to `out_dir` (safetensors + tokenizer + ``finetune.json``) atomically. If `out_dir`
    already holds a fine-tune with the same recipe hash, it is returned as is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    cfg = json.loads((base_dir / "config.json").read_text())
    n_layers = cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers")
    layers = sorted(set(layers)) if layers is not None else last_third(int(n_layers))
    if not layers or layers[0] < 0 or layers[-1] >= int(n_layers):
        raise ForgetlessError(f"layers {layers} are not decoder layers of this model", file=base_dir / "config.json",
                              remedy=f"choose layers in 0..{int(n_layers) - 1}")
    recipe = finetune_recipe(base_dir, steps=steps, seed=seed, layers=layers, lr=lr, batch_size=batch_size)
    digest = _recipe_hash(recipe)
    meta_file = out_dir / "finetune.json"
    if meta_file.exists():
        try:
            if json.loads(meta_file.read_text()).get("hash") == digest:
                log(f"fine-tune: reusing {out_dir} (recipe {digest})")
                return out_dir
            log(f"fine-tune: {out_dir} was made by another recipe; fine-tuning again")
        except json.JSONDecodeError:
            pass
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ForgetlessError("exists and is not a forgetless fine-tune (no finetune.json)", file=out_dir,
                              remedy="remove it or choose another output folder")

    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        tok = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.train()
        names = _trainable(model, layers)
        if not names:
            raise ForgetlessError(f"no parameters found in decoder layers {layers}", file=base_dir,
                                  remedy=f"choose layers in 0..{n_layers - 1}")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        task = zorblax_task(seed)
        data = [encode(tok, ex) for ex in task.train]
        rng = random.Random(seed)
        order: list[int] = []
        losses: list[float] = []
        log(f"fine-tune: {steps} AdamW steps (lr {lr}, batch {batch_size}) on decoder layers "
            f"{layers[0]}..{layers[-1]} ({sum(p.numel() for p in params) / 1e6:.1f}M parameters), "
            f"{len(data)} Zorblax phrases")
        for step in range(steps):
            if len(order) < batch_size:
                perm = list(range(len(data)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[:batch_size], order[batch_size:]
            batch = collate([data[i] for i in idx], tok.pad_token_id)
            loss = -answer_scores(model, batch)["token_logp"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            if step % 10 == 0 or step == steps - 1:
                log(f"  step {step + 1:3d}/{steps}  loss {losses[-1]:.3f}  ({time.perf_counter() - t0:.0f}s)")
        seconds = time.perf_counter() - t0
        model.eval()

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            meta = {"hash": digest, "recipe": recipe, "trained_tensors": names, "losses": losses,
                    "train_seconds": round(seconds, 1)}
            (tmp / "finetune.json").write_text(json.dumps(meta, indent=1))
            os.chmod(tmp, 0o755)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        torch.set_num_threads(prev_threads)
    return out_dir


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model_dir: str | os.PathLike, tok, task: ZorblaxTask,
             general: Sequence[tuple[str, str, str, tuple[str, str]]] = GENERAL, batch_size: int = 40) -> dict:
    """Task accuracy/loss on the held-out phrases; general answer loss and 3-way multiple-choice accuracy.

    ``task_acc``: fraction of held-out phrases whose greedy answer is exactly right (end-of-turn included);
    ``task_loss``: mean NLL per answer token; ``general_loss``: mean NLL per token of the right answer sentences;
    ``general_acc``: fraction of questions whose right sentence is more likely than both wrong ones.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def scores(examples: list[Example]) -> dict[str, torch.Tensor]:
        parts = []
        for i in range(0, len(examples), batch_size):
            rows = [encode(tok, ex) for ex in examples[i : i + batch_size]]
            parts.append(answer_scores(model, collate(rows, tok.pad_token_id)))
        return {k: torch.cat([p[k] for p in parts]) for k in ("seq_logp", "seq_tokens", "seq_exact")}

    t = scores(task.heldout)
    # general: the right sentence and its two wrong variants, each scored by the total log-probability of its tokens
    options = [Example(q, sentence.format(a), eos=False) for q, sentence, gold, wrong in general
               for a in (gold, *wrong)]
    g = scores(options)
    logp = g["seq_logp"].view(len(general), 3)
    gold_tokens = g["seq_tokens"].view(len(general), 3)[:, 0]
    return {
        "task_acc": t["seq_exact"].float().mean().item(),
        "task_loss": (-t["seq_logp"].sum() / t["seq_tokens"].sum()).item(),
        "general_loss": (-logp[:, 0].sum() / gold_tokens.sum()).item(),
        "general_acc": (logp.argmax(1) == 0).float().mean().item(),
    }


class TaskDelta:
    """The fine-tune's change to its trained tensors, held in memory, to measure what a merge kept of it."""

    def __init__(self, base_dir: Path, ft_dir: Path, names: Sequence[str]):
        from .checkpoint.reader import CheckpointReader

        self.names = list(names)
        with CheckpointReader(base_dir) as b, CheckpointReader(ft_dir) as f:
            self.base = {n: b.get(n).float() for n in self.names}
            self.delta = {n: f.get(n).float() - self.base[n] for n in self.names}
        self.norm2 = sum(float(d.square().sum()) for d in self.delta.values())

    def kept(self, merged_dir: Path) -> dict:
        """``kept`` = ‖merged − base‖ / ‖ft − base‖ and ``cos`` = cosine(merged − base, ft − base) over the trained
        tensors; ``nonzero`` = fraction of their entries the merge changed at all."""
        from .checkpoint.reader import CheckpointReader

        num = dot = nz = n = 0.0
        with CheckpointReader(merged_dir) as m:
            for name in self.names:
                d_m = m.get(name).float() - self.base[name]
                num += float(d_m.square().sum())
                dot += float((d_m * self.delta[name]).sum())
                nz += float((d_m != 0).sum())
                n += d_m.numel()
        den = self.norm2
        return {"kept": (num / den) ** 0.5 if den else 0.0,
                "cos": dot / (num * den) ** 0.5 if num and den else 0.0,
                "nonzero": nz / n if n else 0.0}


def weights_digest(model_dir: Path) -> str:
    """sha256 of a model folder's weight files (about a second for the 540 MB model): keys the evaluation cache."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


class EvalCache:
    """Evaluations by weights digest, in ``<workdir>/eval_cache.json``: a second run re-evaluates nothing unchanged."""

    def __init__(self, path: Path, tok, task: ZorblaxTask, seed: int):
        self.path, self.tok, self.task = path, tok, task
        self.key = _recipe_hash({"eval": EVAL_VERSION, "seed": seed, "system": SYSTEM, "general": GENERAL})
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            data = {}
        self.data: dict[str, dict] = data if data.get("_key") == self.key else {"_key": self.key}

    def __call__(self, model_dir: Path) -> tuple[dict, bool]:
        digest = weights_digest(model_dir)
        if digest in self.data:
            return dict(self.data[digest]), True
        scores = evaluate(model_dir, self.tok, self.task)
        self.data[digest] = scores
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
        return scores, False


# ------------------------------------------------------------------------------------------------ the demo
def write_calibration(workdir: Path, task: ZorblaxTask) -> tuple[Path, Path]:
    """Calibration files for the Fisher statistics: the general questions with their right answers, and the
    task's training phrases (never the held-out ones), in the {question, answer} JSONL format."""
    general = workdir / "calibration-general.jsonl"
    general.write_text("".join(json.dumps({"question": q, "answer": sentence.format(right)}) + "\n"
                               for q, sentence, right, _ in GENERAL))
    task_file = workdir / "calibration-task.jsonl"
    task_file.write_text("".join(json.dumps({"question": ex.prompt, "answer": ex.answer}) + "\n"
                                 for ex in task.train))
    return general, task_file


def merge_plan(quick: bool, seed: int = SEED) -> list[tuple[str, dict, dict]]:
    """(method, parameters, extra recipe keys) of the merges the demo runs."""
    plan = [
        ("linear", {"lambda": 0.5}, {}),
        ("ties", {"density": 0.2, "lambda": 1.0}, {}),
    ]
    if not quick:
        plan[1:1] = [("linear", {"lambda": 0.3}, {}), ("linear", {"lambda": 0.7}, {})]
        plan += [("task_arithmetic", {"lambda": 0.8}, {}),
                 ("dare_linear", {"density": 0.3, "lambda": 1.0}, {"seed": seed})]
    return plan


def _knob(params: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in params.items()) if params else "-"


def _table(rows: list[dict]) -> str:
    head = (f"{'model':<16} {'knob':<22} {'task acc':>8} {'task loss':>9} {'gen acc':>8} {'gen loss':>8} "
            f"{'Δ kept':>7} {'cos':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        d = r.get("delta")
        kept, cos = (f"{d['kept']:.2f}", f"{d['cos']:.2f}") if d else ("-", "-")
        lines.append(f"{r['method']:<16} {r['knob']:<22} {r['task_acc']:>8.0%} {r['task_loss']:>9.3f} "
                     f"{r['general_acc']:>8.0%} {r['general_loss']:>8.3f} {kept:>7} {cos:>5}")
    return "\n".join(lines)


def _summaries(rows: list[dict]) -> list[str]:
    """Each merge's report summary: its first line, then its body (the route table) once per run of equal bodies."""
    lines: list[str] = []
    for i, r in enumerate(rows):
        head, _, body = r["summary"].partition("\n")
        lines.append(f"[{r['method']} {r['knob']}] {head}")
        following = rows[i + 1]["summary"].partition("\n")[2] if i + 1 < len(rows) else None
        if body.strip() and body != following:
            lines += ["routes taken by the merge(s) above:", body.strip("\n"), ""]
    return lines[:-1] if lines and not lines[-1] else lines


def run_demo(workdir: str | os.PathLike | None = None, *, steps: int | None = None, quick: bool = False,
             seed: int = SEED, log=print) -> dict:
    """Fine-tune, merge, evaluate and print the table; returns (and writes to workdir/results.json) the numbers.

    `steps` defaults to 40 (24 with `quick`); `quick` also runs two merges instead of six. The fine-tune and every
    evaluation are cached in `workdir` (by recipe hash and weights digest), so a second run only re-merges.
    """
    from transformers import AutoTokenizer

    import forgetless

    from .cgm_chain import cgm_chain
    from .embedded import export_smollm2

    t_start = time.perf_counter()
    workdir = Path(workdir) if workdir is not None else DEFAULT_WORKDIR
    workdir.mkdir(parents=True, exist_ok=True)
    steps = steps if steps is not None else (QUICK_STEPS if quick else DEFAULT_STEPS)
    timings = {"export": 0.0, "finetune": 0.0, "merge": 0.0, "evaluate": 0.0}
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        t = time.perf_counter()
        base_dir = export_smollm2()
        timings["export"] = time.perf_counter() - t

        t = time.perf_counter()
        ft_dir = make_finetuned(base_dir, workdir / "finetuned", steps=steps, seed=seed, log=log)
        timings["finetune"] = time.perf_counter() - t
        ft_meta = json.loads((ft_dir / "finetune.json").read_text())

        t = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(base_dir)
        task = zorblax_task(seed)
        scores = EvalCache(workdir / "eval_cache.json", tok, task, seed)
        delta = TaskDelta(base_dir, ft_dir, ft_meta["trained_tensors"])
        rows: list[dict] = []
        for label, path in (("base", base_dir), ("finetuned", ft_dir)):
            s, cached = scores(path)
            rows.append({"method": label, "knob": "-" if label == "base" else f"{steps} steps", "out": str(path),
                         **s, "cached_eval": cached})
        timings["evaluate"] += time.perf_counter() - t

        for method, params, extra in merge_plan(quick, seed):
            name = f"{method}-" + "-".join(f"{k}{v:g}" for k, v in params.items())
            out = workdir / "merged" / name
            recipe = {"method": method, "base": str(base_dir), "models": [{"model": str(ft_dir)}],
                      "parameters": params, "out": str(out), **extra}
            t = time.perf_counter()
            report = forgetless.merge(recipe, out=out, force=True, progress=False)
            seconds = time.perf_counter() - t
            timings["merge"] += seconds
            t = time.perf_counter()
            s, cached = scores(out)
            row = {"method": method, "knob": _knob(params), "out": str(out), **s, "cached_eval": cached,
                   "delta": delta.kept(out), "merge_seconds": round(seconds, 2), "summary": report.summary()}
            timings["evaluate"] += time.perf_counter() - t
            rows.append(row)
            log(f"merge {name}: {seconds:.1f}s; task acc {row['task_acc']:.0%}, general acc "
                f"{row['general_acc']:.0%}{' (cached evaluation)' if cached else ''}")

        if not quick:  # the curvature-guided merges: Fisher at θ₀ on general data, at θ_ft on the task's data
            general_data, task_data = write_calibration(workdir, task)
            for method, params in (("cgm", {"alpha": 0.2}), ("cgm_dagger", {"keep": 0.95, "alpha": 1.0})):
                out = workdir / "merged" / method
                t = time.perf_counter()
                report = cgm_chain(base_dir, ft_dir, general_data=general_data, task_data=task_data, out=out,
                                   method=method, n=16, seed=seed, stats_dir=workdir / "statistics", force=True,
                                   log=None, **params)
                seconds = time.perf_counter() - t
                timings["merge"] += seconds
                t = time.perf_counter()
                s, cached = scores(out)
                rows.append({"method": method, "knob": _knob(params), "out": str(out), **s, "cached_eval": cached,
                             "delta": delta.kept(out), "merge_seconds": round(seconds, 2),
                             "summary": report.summary() if report else ""})
                timings["evaluate"] += time.perf_counter() - t
                log(f"merge {method} (statistics included): {seconds:.1f}s; task acc {rows[-1]['task_acc']:.0%}, "
                    f"general acc {rows[-1]['general_acc']:.0%}")
    finally:
        torch.set_num_threads(prev_threads)
    timings["total"] = time.perf_counter() - t_start

    layers = ft_meta["recipe"]["layers"]
    log("")
    log(f"Zorblax task: {len(task.train)} training phrases, {len(task.heldout)} held-out pairs. General: "
        f"{len(GENERAL)} questions. Fine-tuned: decoder layers {layers[0]}..{layers[-1]}, {steps} AdamW steps.")
    log("task acc: greedy answer exactly right; gen acc: right answer likelier than 2 wrong ones; losses: mean "
        "NLL per answer token;")
    log("Δ kept, cos: size of (merged − base) relative to (finetuned − base), and their cosine, on the trained "
        "tensors.")
    log(_table(rows))
    log("")
    for line in _summaries(rows[2:]):
        log(line)
    log("")
    log("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"  (results: {workdir})")

    results = {"workdir": str(workdir), "base": str(base_dir), "finetuned": str(ft_dir),
               "finetune": {k: ft_meta[k] for k in ("hash", "recipe", "losses", "train_seconds")},
               "task": {"lexicon": task.lexicon, "train": len(task.train), "heldout": len(task.heldout)},
               "general_questions": len(GENERAL), "rows": rows,
               "timings": {k: round(v, 1) for k, v in timings.items()}}
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    return results
