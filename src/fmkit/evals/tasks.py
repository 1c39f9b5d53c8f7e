"""Tasks are data: a YAML file names the items and how to turn each into a prompt, choices and a target.

```yaml
task: my_mc                      # name (default: the file name)
type: multiple_choice            # multiple_choice | generate_until | code | perplexity
dataset: {path: items.jsonl}     # .jsonl / .json / .parquet, relative to the YAML; or {hf: id, split: test}
doc_to_text: "Question: {{question}}\nAnswer:"      # Jinja over the item's fields
doc_to_choice: choices           # a field name, a Jinja expression giving a list, or a literal list
doc_to_target: answer            # index into the choices, or the gold string
target_delimiter: " "
num_fewshot: 0                   # examples drawn with fewshot_seed from fewshot_dataset (default: other items)
metrics: [acc, acc_norm]
```
Generate-until tasks add `generation: {until: [...], max_tokens: N}`, `filters` (regex with `group`, `select:
first|last`, `strip`, `lowercase`) and `exact_match: {ignore_case, ignore_punctuation, regexes_to_ignore}`; code
tasks add `code: {program: "{{prompt}}{{completion}}\n{{test}}\ncheck({{entry_point}})", k: [1], samples: 1}`;
perplexity tasks name the text field with `doc_to_text`; red-team tasks (`type: redteam`) add `redteam: {vars,
templates, success, category, refusals}` (redteam.py, docs/redteam.md).

A suite is a YAML file holding only `suite: [task, ...]` (names or paths, relative to the suite's folder first);
`load_tasks` expands it, e.g. the built-in `redteam` into its five probe tasks.
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..config import unknown_key
from ..errors import FmkitError
from .metrics import CODE_METRICS, GEN_METRICS, JUDGE_METRICS, MC_METRICS, PPL_METRICS, REDTEAM_METRICS

TYPES = {"multiple_choice": MC_METRICS, "generate_until": GEN_METRICS, "code": CODE_METRICS,
         "perplexity": PPL_METRICS, "judge": JUDGE_METRICS, "redteam": REDTEAM_METRICS}
BUILTIN = Path(__file__).parent / "tasks"


@dataclass
class Task:
    task: str = ""
    type: str = "multiple_choice"
    dataset: dict = field(default_factory=dict)
    doc_to_text: str = "{{question}}"
    doc_to_choice: object = "choices"
    doc_to_target: object = "answer"
    doc_to_id: str = ""                    # a field naming each item (default: its position)
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    fewshot_dataset: dict = field(default_factory=dict)
    description: str = ""                  # text put before the few-shot examples
    metrics: list = field(default_factory=list)
    generation: dict = field(default_factory=dict)
    filters: list = field(default_factory=list)
    exact_match: dict = field(default_factory=dict)
    code: dict = field(default_factory=dict)
    judge: dict = field(default_factory=dict)   # {model: SPEC, mode: single|pairwise, baseline: FIELD, base_url}
    robustness: list = field(default_factory=list)  # perturbations: lowercase, contractions, typos, extra_spaces
    fairness: list = field(default_factory=list)    # counterfactual swaps: names, pronouns
    redteam: dict = field(default_factory=dict)     # probes: {vars, templates, success, category, refusals}
    chat: bool = False                     # send prompts as chat messages (chat models, chat templates)
    scoring: str = "loglikelihood"         # multiple choice: loglikelihood | generate (for chat-only APIs)
    limit: int = 0                         # evaluate the first N items only
    source: str = ""                       # the YAML file (set on load)

    def fingerprint(self, fewshot_ids: list, tokenizer: str = "") -> str:
        """A hash of everything that decides the prompts and scores: task, templates, few-shot set, tokenizer."""
        blob = json.dumps({k: v for k, v in asdict(self).items() if k not in ("source", "limit")}, sort_keys=True,
                          default=str) + json.dumps(fewshot_ids) + tokenizer
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _env():
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _find(path: str | Path, near: Path | None = None) -> Path:
    """A task or suite file: a path (relative to `near` first, for a suite's entries) or a built-in task's name."""
    p = Path(path)
    if near is not None and not p.is_absolute() and (near / p).is_file():
        return near / p
    if not p.suffix and not p.exists():
        for folder in ([near] if near is not None else []) + [BUILTIN]:
            if (folder / f"{p}.yaml").is_file():
                return folder / f"{p}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in BUILTIN.glob("*.yaml")))
        raise FmkitError(f"task file {p} not found (built-in tasks: {known})")
    return p


def _read(p: Path) -> dict:
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise FmkitError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise FmkitError(f"{p} must be a mapping of task fields, got {type(doc).__name__}")
    return doc


def load_tasks(specs: list[str | Path]) -> list[Task]:
    """Tasks from task files, built-in names and suites (expanded in order); a task named twice runs once."""
    out, seen = [], set()

    def add(spec, near: Path | None, chain: tuple) -> None:
        p = _find(spec, near)
        key = p.resolve()
        if key in chain:
            raise FmkitError(f"{p}: the suite includes itself (through {' -> '.join(x.name for x in chain)})")
        doc = _read(p)
        if "suite" not in doc:
            if key not in seen:
                seen.add(key)
                out.append(load_task(p))
            return
        entries = doc["suite"]
        if set(doc) != {"suite"} or not isinstance(entries, list) or not entries:
            raise FmkitError(f"{p}: a suite holds only `suite: [task, ...]`, a non-empty list of task names or files")
        for entry in entries:
            add(str(entry), p.parent, chain + (key,))

    for spec in specs:
        add(spec, None, ())
    return out


def load_task(path: str | Path) -> Task:
    """Read and check a task YAML; errors name the file and the field. A bare name finds a built-in task."""
    p = _find(path)
    doc = _read(p)
    if "suite" in doc:
        raise FmkitError(f"{p} is a suite of tasks, not one task: load it with load_tasks (fmkit eval takes both)")
    fields = {f for f in Task.__dataclass_fields__ if f != "source"}
    for k in doc:
        if k not in fields:
            raise unknown_key(str(k), str(p), sorted(fields))
    task = Task(**doc, source=str(p))
    task.task = task.task or p.stem
    if task.type not in TYPES:
        raise FmkitError(f"{p}: type '{task.type}' is not one of {', '.join(TYPES)}")
    if not task.metrics:
        task.metrics = {"multiple_choice": ["acc", "acc_norm"], "generate_until": ["exact_match"],
                        "code": ["pass@k"], "perplexity": list(PPL_METRICS),
                        "judge": ["rating"] if task.judge.get("mode", "single") == "single"
                        else ["win_rate", "tie_rate", "loss_rate"], "redteam": list(REDTEAM_METRICS)}[task.type]
    for m in task.metrics:
        if m not in TYPES[task.type]:
            raise FmkitError(f"{p}: metric '{m}' is not available for {task.type} tasks "
                             f"(available: {', '.join(TYPES[task.type])})")
    if not isinstance(task.dataset, dict) or not (task.dataset.get("path") or task.dataset.get("hf")
                                                  or task.dataset.get("builtin")):
        raise FmkitError(f"{p}: field 'dataset' must be a mapping with path: (or hf:, builtin:)")
    if task.type == "judge" and not task.judge.get("model"):
        raise FmkitError(f"{p}: a judge task needs judge: {{model: SPEC}} (a model folder, openai:NAME, ...)")
    if task.type == "judge" and task.judge.get("mode", "single") not in ("single", "pairwise"):
        raise FmkitError(f"{p}: judge.mode must be single or pairwise")
    if task.scoring not in ("loglikelihood", "generate"):
        raise FmkitError(f"{p}: scoring must be loglikelihood or generate, got '{task.scoring}'")
    if task.type == "redteam":
        from .redteam import check_config

        check_config(task)
    for key in ("doc_to_text", "description"):
        try:
            _env().from_string(getattr(task, key))
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise FmkitError(f"{p}: field '{key}' is not a valid template ({e})") from None
    return task


def load_items(task: Task, spec: dict | None = None) -> list[dict]:
    """The task's items (dicts) from its dataset spec: a local file relative to the YAML, hf, or builtin."""
    spec = spec if spec is not None else task.dataset
    where = f"{task.source}: dataset"
    if spec.get("builtin"):
        from . import stdlib_tasks

        maker = getattr(stdlib_tasks, spec["builtin"], None)
        if maker is None:
            raise FmkitError(f"{where}: no built-in dataset '{spec['builtin']}'")
        return maker(**{k: v for k, v in spec.items() if k != "builtin"})
    if spec.get("hf"):
        try:
            import datasets
        except ImportError:
            raise FmkitError(f"{where} names a Hugging Face dataset: pip install 'fmkit[hf]'") from None
        try:
            ds = datasets.load_dataset(spec["hf"], spec.get("name"), split=spec.get("split", "test"))
        except Exception as e:
            raise FmkitError(f"{where}: cannot load '{spec['hf']}' ({str(e).splitlines()[0]})") from None
        return [dict(r) for r in ds]
    base = Path(task.source).parent if task.source else Path(".")
    path = Path(spec["path"])
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise FmkitError(f"{where}: data file {path} not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FmkitError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        return data if isinstance(data, list) else data.get(spec.get("field", "data"), [])
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FmkitError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise FmkitError(f"{path}:{i}: each line must be a JSON object")
        items.append(row)
    return items


class Renderer:
    """Turns items into prompt text, choices and targets, with few-shot examples; errors name the field."""

    def __init__(self, task: Task):
        self.task = task
        env = _env()
        self._text = env.from_string(task.doc_to_text)
        self._desc = env.from_string(task.description) if task.description else None
        self._choice = env.from_string(task.doc_to_choice) if isinstance(task.doc_to_choice, str) else None
        self._target = env.from_string(str(task.doc_to_target))

    def _fail(self, field_name: str, item_no, e) -> FmkitError:
        return FmkitError(f"{self.task.source}: field '{field_name}' fails on item {item_no} "
                          f"({type(e).__name__}: {e})")

    transform = None   # a perturbation applied to the item's text (not to few-shot examples)

    def text(self, item: dict, n=None, raw: bool = False) -> str:
        try:
            text = self._text.render(**item)
        except Exception as e:
            raise self._fail("doc_to_text", n, e) from None
        return self.transform(text) if (self.transform and not raw) else text

    def choices(self, item: dict, n=None) -> list[str]:
        spec = self.task.doc_to_choice
        if isinstance(spec, list):
            value = spec
        elif isinstance(spec, str) and spec in item:
            value = item[spec]
        else:
            try:
                rendered = self._choice.render(**item)
                value = ast.literal_eval(rendered)
            except Exception as e:
                raise self._fail("doc_to_choice", n, e) from None
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) for c in value):
            raise FmkitError(f"{self.task.source}: field 'doc_to_choice' must give a non-empty list of strings; "
                             f"item {n} gives {value!r}"[:300])
        return list(value)

    def target(self, item: dict, n=None, choices: list | None = None):
        spec = self.task.doc_to_target
        if isinstance(spec, int):
            value = spec
        elif isinstance(spec, str) and spec in item:
            value = item[spec]
        else:
            try:
                value = self._target.render(**item)
            except Exception as e:
                raise self._fail("doc_to_target", n, e) from None
        if choices is None:
            return str(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(choices):
                raise FmkitError(f"{self.task.source}: item {n}: target index {value} is outside its "
                                 f"{len(choices)} choices")
            return value
        if value in choices:
            return choices.index(value)
        raise FmkitError(f"{self.task.source}: item {n}: target {value!r} is not one of its choices")

    def gold_text(self, item: dict, n=None) -> str:
        if self.task.type == "multiple_choice":
            ch = self.choices(item, n)
            return ch[self.target(item, n, ch)]
        return self.target(item, n)

    def fewshot(self, items: list[dict], pool: list[dict], index: int | None) -> tuple[str, list]:
        """The few-shot prefix for one item: description + k examples (fixed seed; the item itself excluded)."""
        t = self.task
        k = t.num_fewshot
        prefix = self._desc.render() if self._desc else ""
        if k <= 0:
            return prefix, []
        candidates = [i for i in range(len(pool)) if not (pool is items and i == index)]
        rng = random.Random(t.fewshot_seed)
        chosen = rng.sample(candidates, min(k, len(candidates)))
        shots = []
        for i in chosen:
            ex = pool[i]
            shots.append(self.text(ex, f"fewshot {i}", raw=True) + t.target_delimiter + self.gold_text(ex, f"fewshot {i}"))
        return prefix + t.fewshot_delimiter.join(shots) + t.fewshot_delimiter, chosen
