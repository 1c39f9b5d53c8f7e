"""The verb table: every fmkit verb, declared once, in lifecycle order.

Each row names a Python function; its signature (parameter names, types, defaults) and the `Args:` section of its
docstring (one line of help per parameter) *are* the command line: `cli.py` builds the commands from them, and
`fmkit/__init__.py` exports the same functions. Targets are "module:function" strings so that `import fmkit` and
`fmkit --help` do not import torch; `test_verbs.py` imports every one of them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Verb:
    name: str                    # as typed after `fmkit`: "pretrain", "curate report"
    target: str                  # "module:function"
    py: str = ""                 # its name in the `fmkit` namespace (default: the function's own name)
    default: bool = False        # what `fmkit GROUP ARGS` runs when ARGS name no sub-verb (`fmkit curate R.yaml`)
    flags: dict = field(default_factory=dict)   # parameter -> its spellings, where not --the-name
    overrides: str = ""          # parameter that collects `--section.key=value` recipe overrides
    unescape: tuple = ()         # parameters whose command-line text has backslash escapes (`--stop '\n\n'`)
    positional: tuple = ()       # parameters given as arguments although they have a default (`fmkit serve [REF...]`)

    @property
    def function(self):
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def python_name(self) -> str:
        return self.py or self.target.split(":")[1]

    @property
    def group(self) -> str:
        return self.name.split()[0] if " " in self.name else ""


VERBS = (
    Verb("quickstart", "fmkit.lifecycle:quickstart"),
    Verb("curate run", "fmkit.data.curate:curate", default=True, overrides="overrides"),
    Verb("curate report", "fmkit.data.report:curate_report"),
    Verb("curate ngrams", "fmkit.evals.ngrams:build_ngram_index"),
    Verb("tokenizer train", "fmkit.tokenize.tokenizer:train_tokenizer"),
    Verb("pack", "fmkit.tokenize.pack:pack"),
    Verb("pretrain", "fmkit.train.pretrain:pretrain", overrides="overrides"),
    Verb("finetune", "fmkit.adapt.finetune:finetune", flags={"target_modules": ["--target"]}),
    Verb("dpo", "fmkit.adapt.dpo:dpo"),
    Verb("reward", "fmkit.adapt.reward:reward"),
    Verb("rl", "fmkit.adapt.rl:rl"),
    Verb("classify train", "fmkit.adapt.classify:train_classifier", py="classify", default=True),
    Verb("classify predict", "fmkit.adapt.classify:predict"),
    Verb("merge", "fmkit.adapt.finetune:merge"),
    Verb("adapt auto", "fmkit.select.ladder:adapt_auto"),
    Verb("rag index", "fmkit.adapt.rag:index", py="rag_index", flags={"metadata": ["--meta"]}),
    Verb("rag ask", "fmkit.adapt.rag:ask", py="rag_ask", flags={"filters": ["--filter"]}),
    Verb("eval run", "fmkit.evals.runner:evaluate", default=True),
    Verb("eval report", "fmkit.evals.report:eval_report"),
    Verb("compare", "fmkit.select.compare:compare"),
    Verb("arena serve", "fmkit.select.arena:arena", default=True),
    Verb("arena ratings", "fmkit.select.arena:arena_ratings"),
    Verb("arena judge", "fmkit.select.arena:arena_judge"),
    Verb("arena export", "fmkit.select.arena:arena_export"),
    Verb("generate", "fmkit.models.generate:generate", flags={"prompts": ["--prompt", "-p"]}, unescape=("stop",)),
    Verb("chat", "fmkit.conversation:chat"),
    Verb("serve", "fmkit.server.launch:serve", positional=("models",), flags={"names": ["--name"]}),
    Verb("monitor init", "fmkit.select.monitor:monitor_init"),
    Verb("monitor run", "fmkit.select.monitor:monitor_run"),
    Verb("monitor report", "fmkit.select.monitor:monitor_report"),
    Verb("scale plan", "fmkit.scale.plan:scale_plan", flags={"time_budget": ["--time"], "sizes": ["--sizes"]}),
    Verb("scale run", "fmkit.scale.run:scale_run"),
    Verb("scale fit", "fmkit.scale.report:scale_fit", flags={"budgets": ["--budget"]}),
    Verb("scale check", "fmkit.scale.check:scale_check"),
    Verb("scale emergence", "fmkit.scale.emergence:scale_emergence", flags={"tasks": ["--tasks", "--task"]}),
    Verb("registry", "fmkit.workspace:registry"),
)

GROUPS = {
    "curate": "Curate raw sources into a dataset, summarise one, or index its n-grams for contamination checks.",
    "tokenizer": "Train byte-level BPE tokenizers.",
    "classify": "Train a classification head on an encoder, or predict labels with one.",
    "adapt": "Adapt a base model to a task: climb the ladder from prompting to fine-tuning, stopping at a target.",
    "rag": "Retrieval-augmented generation over local documents: index them, then ask.",
    "eval": "Evaluate a model on tasks, or report on an eval run.",
    "arena": "People vote between two anonymous models' answers: the page, ratings, a judge, preference export.",
    "monitor": "Watch a model for changes: fix canaries, run them from cron, alert when the model differs.",
    "scale": "Scaling laws: plan a ladder of pre-training runs, run it, fit L(N, D) and the compute-optimal size, "
             "check the fit on a larger run, and plot eval scores against compute.",
}


def by_python_name(name: str) -> Verb | None:
    return next((v for v in VERBS if v.python_name == name), None)
