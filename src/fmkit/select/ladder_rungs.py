"""The rungs of `fmkit adapt auto`: each turns (base, task, training data, documents) into a model reference and a
task to evaluate it on, plus the artifact a user would keep (a prompt file, an index, an adapter, a model).

Prompting rungs change the prompt, not the model: they write a derived task whose items carry a context (nearest
training examples, retrieved chunks) in front of the task's own `doc_to_text`, so every rung is scored by the same
`evaluate` on the same items with the same ids.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..errors import FmkitError
from ..evals.tasks import Renderer, Task

CONTEXT = "ladder_context"   # the item field that carries a rung's context


@dataclass
class Setup:
    """What every rung reads: the base, the held-out task and items, the run folder and the rung settings."""

    base: str
    task: Task
    items: list[dict]
    train: Path | None
    docs: Path | None
    run: Path
    workspace: str | Path | None
    shots: int = 3
    lora_steps: int = 60
    full_steps: int = 60
    pretrain_steps: int = 60
    batch_size: int = 8
    seed: int = 0
    remote: bool = False
    training_tokens: dict = field(default_factory=dict)   # rung -> tokens trained on


@dataclass
class Built:
    """A rung ready to evaluate: the model reference, the task file, and the artifact it leaves."""

    model: str
    task: Path
    artifact: Path
    kind: str          # prompt | rag-index | adapter | model
    detail: str        # what the rung did, for the table


def read_train(path: Path) -> list[dict]:
    """Prompt/completion rows of --train (the format `fmkit finetune` takes); errors name the line."""
    if not path.is_file():
        raise FmkitError(f"--train {path} not found; give a prompt/completion JSONL file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FmkitError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or \
                not isinstance(row.get("completion"), str):
            raise FmkitError(f"{path}:{n}: each line needs string fields 'prompt' and 'completion'")
        rows.append({"prompt": row["prompt"], "completion": row["completion"]})
    if not rows:
        raise FmkitError(f"--train {path} has no examples")
    return rows


def task_file(s: Setup, name: str, contexts: list[str] | None = None) -> Path:
    """The task as a self-contained YAML over its loaded items, each with `contexts[i]` before its prompt."""
    folder = s.run / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    items = [dict(it, **{CONTEXT: contexts[i] if contexts else ""}) for i, it in enumerate(s.items)]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(i, default=str) + "\n" for i in items))
    doc = {k: v for k, v in asdict(s.task).items() if k not in ("source", "limit")}
    doc.update(dataset={"path": f"{name}.jsonl"}, doc_to_text="{{" + CONTEXT + "}}" + s.task.doc_to_text)
    if s.task.fewshot_dataset.get("path"):   # a path relative to the original YAML must still find its file
        doc["fewshot_dataset"] = dict(s.task.fewshot_dataset, path=str(
            (Path(s.task.source).parent / s.task.fewshot_dataset["path"]).resolve()))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def item_texts(s: Setup) -> list[str]:
    r = Renderer(s.task)
    return [r.text(it, n) for n, it in enumerate(s.items)]


def zero_shot(s: Setup) -> Built:
    path = task_file(s, "zero-shot")
    return Built(s.base, path, path, "prompt", "the task's own prompt")


def few_shot(s: Setup) -> Built:
    """The `shots` training examples nearest each item by MiniLM cosine similarity (PromptTemplate, nearest)."""
    from ..adapt.prompting import PromptTemplate
    from ..adapt.rag.encoder import BUILTIN, load_encoder

    if s.train is None:
        raise Skip("no --train examples to show")
    rows = read_train(s.train)
    encoder = load_encoder(BUILTIN)
    p = PromptTemplate("{{prompt}}", answer="{{completion}}", examples=rows, k=s.shots, select="nearest",
                       embed=encoder.embed, separator=s.task.fewshot_delimiter)
    texts = item_texts(s)
    contexts = []
    for text in texts:
        full = p.render({"prompt": text, "completion": ""})
        contexts.append(full[:len(full) - len(text)])
    path = task_file(s, "few-shot", contexts)
    prompt = s.run / "artifacts" / "few-shot-prompt.json"
    prompt.parent.mkdir(parents=True, exist_ok=True)
    prompt.write_text(json.dumps({"template": "{{prompt}}", "answer": "{{completion}}", "k": s.shots,
                                  "select": "nearest", "encoder": BUILTIN, "separator": s.task.fewshot_delimiter,
                                  "examples": str(s.train.resolve()), "task": str(path)}, indent=2))
    return Built(s.base, path, prompt, "prompt", f"{s.shots} nearest of {len(rows)} training examples")


def rag(s: Setup) -> Built:
    """The top `shots` chunks of an index over --docs before each item, the best match nearest the question."""
    from ..adapt import rag as rag_

    if s.docs is None:
        raise Skip("no --docs to retrieve from")
    index_dir = s.run / "artifacts" / "rag-index"
    stats = rag_.index(s.docs, index_dir, workspace=s.workspace)
    contexts = []
    for text in item_texts(s):
        hits = rag_.ask(index_dir, text, k=s.shots)["chunks"]
        contexts.append("".join(h["text"].strip() + s.task.fewshot_delimiter for h in reversed(hits)))
    path = task_file(s, "rag", contexts)
    return Built(s.base, path, index_dir, "rag-index",
                 f"top-{s.shots} of {stats['chunks']} chunks from {stats['documents']} documents")


def _train_data(s: Setup) -> Path:
    if s.remote:
        raise Skip(f"the base {s.base} is a remote model: its weights cannot be trained here")
    if s.train is None:
        raise Skip("no --train examples to fine-tune on")
    read_train(s.train)   # the same line-numbered errors as the prompting rungs
    return s.train


def _tokens(name: str, s: Setup):
    def on_log(record: dict) -> None:
        s.training_tokens[name] = max(s.training_tokens.get(name, 0), int(record.get("tokens_seen", 0)))
    return on_log


def lora(s: Setup) -> Built:
    from ..adapt.finetune import finetune

    data = _train_data(s)
    out = finetune(s.base, data, s.run / "artifacts" / "lora", lora=True, steps=s.lora_steps, lr=1e-2,
                   batch_size=s.batch_size, template="none", seed=s.seed, workspace=s.workspace,
                   on_log=_tokens("LoRA", s))
    return Built(str(out), task_file(s, "lora"), out, "adapter", f"LoRA r=8, {s.lora_steps} steps")


def full(s: Setup) -> Built:
    from ..adapt.finetune import finetune

    data = _train_data(s)
    out = finetune(s.base, data, s.run / "artifacts" / "full", steps=s.full_steps, lr=1e-3, batch_size=s.batch_size,
                   template="none", seed=s.seed, workspace=s.workspace, on_log=_tokens("full fine-tune", s))
    return Built(str(out), task_file(s, "full"), out, "model", f"all weights, {s.full_steps} steps")


def pretrain(s: Setup) -> Built:
    """Continued pre-training of the base on --docs (packed with the base's own tokenizer)."""
    from ..tokenize.pack import pack
    from ..train.pretrain import pretrain as pretrain_

    if s.remote:
        raise Skip(f"the base {s.base} is a remote model: its weights cannot be trained here")
    if s.docs is None:
        raise Skip("no --docs (domain text) to continue pre-training on")
    base = Path(s.base)
    if not (base / "config.json").is_file():
        raise Skip(f"continued pre-training needs a model folder as the base, not {s.base}")
    shards = pack(str(s.docs), base, s.run / "artifacts" / "domain-shards", workspace=s.workspace)
    ctx = int(json.loads((base / "config.json").read_text()).get("max_position_embeddings", 128))
    out = pretrain_(overrides={"model.init_from": str(base), "data.shards": str(shards),
                               "out": str(s.run / "artifacts" / "continued"), "train.steps": s.pretrain_steps,
                               "train.batch_size": s.batch_size, "train.seq_len": min(64, ctx),
                               "train.warmup_steps": 2, "train.precision": "fp32", "train.lr": 1e-3,
                               "train.save_every": 0, "train.keep_last": 0},
                    workspace=s.workspace, on_log=_tokens("continued pre-training", s))
    return Built(str(out), task_file(s, "continued"), out, "model", f"{s.pretrain_steps} steps on --docs")


class Skip(Exception):
    """A rung that cannot run here, with the reason (not an error: the ladder goes on)."""


RUNGS = (("zero-shot", zero_shot), ("few-shot", few_shot), ("RAG", rag), ("LoRA", lora),
         ("full fine-tune", full), ("continued pre-training", pretrain))
