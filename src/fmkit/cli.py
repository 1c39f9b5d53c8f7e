"""The `fmkit` command, generated from the verb table (verbs.py): each verb's Python signature is its command line.

A parameter without a default is a positional argument; one with a default is an option (`lora_r` -> `--lora-r`,
a bool -> a flag, a list -> a repeatable option, a dict -> repeatable `key=value`, a Literal -> a choice). Help comes
from the function's docstring: the summary for the verb, the `Args:` lines for its parameters. Parameters whose
type has no command-line form (callables, objects) are for Python callers only and must have defaults. Every
command also takes `--json`, which prints the verb's return value as JSON instead of the usual summary.

Commands are built when used, so `fmkit VERB` imports that verb's module only.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path

import click

from .errors import FmkitError
from .verbs import GROUPS, VERBS, Verb

CLI_ONLY = ("json_output",)   # parameters every command has that no function does


def parse_doc(doc: str | None) -> tuple[str, dict[str, str]]:
    """(help text before `Args:`, {parameter: its one-line help}) from a Google-style docstring."""
    text = inspect.cleandoc(doc or "")
    body, _, args = text.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        m = re.match(r"^\s{2,6}(\w+):\s*(.*)$", line)
        if m:
            name = m.group(1)
            helps[name] = m.group(2).strip()
        elif name and line.strip() and not re.match(r"^\S", line):
            helps[name] += " " + line.strip()
        elif re.match(r"^\S", line):    # the next section (Returns:, ...) ends Args
            break
    return body.strip(), helps


@dataclasses.dataclass
class Kind:
    """How one parameter's Python type appears on the command line."""

    type: object = click.STRING
    many: bool = False      # list: repeatable option / several positional values
    flag: bool = False      # bool
    pairs: bool = False     # dict: repeatable key=value


def cli_kind(annotation) -> Kind | None:
    """The command-line form of a type hint, or None when it has none (a Python-only parameter)."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)] \
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]
    for a in members:
        origin = typing.get_origin(a)
        if origin in (list, tuple):
            inner = cli_kind((typing.get_args(a) or (str,))[0])
            return dataclasses.replace(inner, many=True) if inner else None
        if origin is dict or a is dict:
            return Kind(pairs=True, many=True)
        if origin is typing.Literal:
            return Kind(click.Choice([str(x) for x in typing.get_args(a)]))
    for a in (str, int, float, bool, Path):   # str before Path: references like openai:NAME stay as typed
        if a in members:
            return Kind(flag=True) if a is bool else Kind({str: click.STRING, int: click.INT, float: click.FLOAT,
                                                           Path: click.Path(path_type=Path)}[a])
    return None


def pairs(values, option: str) -> dict:
    """`["lang=en", "team=infra"]` -> `{"lang": "en", "team": "infra"}`; a key given twice collects a list."""
    out: dict = {}
    for pair in values:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FmkitError(f"{option} takes key=value, got {pair!r}")
        key = key.strip()
        out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value] if key in out else value
    return out


def option_names(verb: Verb, param: str) -> list[str]:
    return list(verb.flags.get(param) or ["--" + param.replace("_", "-")])


def unescape(text: str) -> str:
    """`\\n`, `\\t` as typed in a shell, as the characters they stand for; text whose backslashes are no
    escapes (a lone `\\`, a Windows path) stays as typed."""
    try:
        return text.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    except UnicodeError:
        return text


def command(verb: Verb) -> click.Command:
    """The click command for one verb, read off its function."""
    fn = verb.function
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    summary, helps = parse_doc(fn.__doc__)
    params, kinds, arg_help = [], {}, []
    names = list(sig.parameters)
    for p in sig.parameters.values():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name == verb.overrides:
            continue
        kind = cli_kind(hints.get(p.name, str))
        if kind is None:
            continue
        kinds[p.name] = kind
        help_ = helps.get(p.name, "")
        positional = p.default is p.empty or p.name in verb.positional or (
            verb.overrides and names.index(p.name) < names.index(verb.overrides))
        if positional:
            required = p.default is p.empty
            # no default at all for a required argument: click counts even None as a value given
            params.append(click.Argument([p.name], type=kind.type, nargs=-1 if kind.many else 1, required=required,
                                         **({} if required else {"default": p.default})))
            arg_help.append((p.name.upper() + ("..." if kind.many else ""), help_))
            continue
        decls = option_names(verb, p.name)
        if p.name == "workspace":
            decls.append("-w")
        default = p.default
        if kind.flag:
            if default:
                decls = [f"{decls[0]}/--no-{decls[0][2:]}"] + decls[1:]
            params.append(click.Option([*decls, p.name], is_flag=True, default=bool(default), help=help_))
            continue
        if kind.many:
            default = () if default is None else tuple(default) if isinstance(default, (list, tuple)) else (default,)
            if kind.pairs:
                help_ += " (key=value; repeatable)"
        params.append(click.Option([*decls, p.name], type=kind.type, multiple=kind.many, default=default, help=help_,
                                   show_default=default not in (None, (), "")))
    params.append(click.Option(["--json", "json_output"], is_flag=True, help="Print the result as JSON."))
    if verb.overrides:
        help_ = helps.get(verb.overrides, "Recipe overrides: --section.key=value")
        arg_help.append(("--SECTION.KEY=VALUE...", help_))
    text = summary
    if arg_help:
        width = max(len(n) for n, _ in arg_help) + 2
        text += "\n\n\b\nArguments:\n" + "\n".join(f"  {n.ljust(width)}{h}" for n, h in arg_help)

    def run(json_output: bool = False, **kw):
        ctx = click.get_current_context()
        for name, kind in kinds.items():
            if kind.many and name in kw:
                default = sig.parameters[name].default
                values = list(kw[name])
                if kind.pairs:
                    kw[name] = pairs(values, option_names(verb, name)[0]) if values else default
                else:
                    kw[name] = values if values or default is not None else None
        for name in verb.unescape:
            kw[name] = [unescape(s) for s in kw[name]] if isinstance(kw[name], list) else kw[name]
        if verb.overrides:
            extra = list(ctx.args)
            first = names[names.index(verb.overrides) - 1]
            if isinstance(kw.get(first), str) and kw[first].startswith("--"):   # no recipe: an override landed here
                extra.insert(0, kw.pop(first))
            kw[verb.overrides] = extra
        result = fn(**kw)
        if json_output:
            click.echo(json.dumps(result, indent=2, default=_jsonable, ensure_ascii=False))
        else:
            show(verb, result, kw)
        if isinstance(result, dict) and result.get("exit_code"):   # a verb that reports by status (monitor run)
            ctx.exit(result["exit_code"])

    settings = {"ignore_unknown_options": True, "allow_extra_args": True} if verb.overrides else {}
    return click.Command(verb.name.split()[-1], callback=run, params=params, help=text, context_settings=settings,
                         short_help=summary.split("\n")[0].rstrip("."), no_args_is_help=any(
                             isinstance(p, click.Argument) and p.required for p in params))


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    if isinstance(x, (Path, set)):
        return str(x) if isinstance(x, Path) else sorted(x)
    return repr(x)


class Group(click.Group):
    """A group of verbs built on demand from the table; `default` runs when the first word names no sub-verb."""

    def __init__(self, name: str, verbs: list[Verb], **kw):
        super().__init__(name, **kw)
        self.verbs = {v.name.split()[-1] if v.group == name else v.name.split()[0]: v for v in verbs}
        self.default = next((v.name.split()[-1] for v in verbs if v.default and v.group == name), None)

    def list_commands(self, ctx):
        return list(self.verbs)

    def get_command(self, ctx, name):
        v = self.verbs.get(name)
        if v is None:
            return None
        if v.group and v.group != self.name:   # a sub-group of the top level
            return Group(v.group, [x for x in VERBS if x.group == v.group], help=GROUPS.get(v.group, ""),
                         no_args_is_help=True)
        return command(v)

    def parse_args(self, ctx, args):
        if self.default and args and args[0] not in self.verbs and args[0] not in ("--help", "-h"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


def _top_level() -> list[Verb]:
    """One entry per top-level word: a plain verb, or the first verb of a group standing for it."""
    seen, out = set(), []
    for v in VERBS:
        word = v.name.split()[0]
        if word not in seen:
            seen.add(word)
            out.append(v)
    return out


app = Group("fmkit", _top_level(), help="fmkit: curate data, train a tokenizer, pre-train, adapt, evaluate, generate "
            "and chat with foundation models. Each verb is also a Python function: fmkit.VERB(...) takes the same "
            "arguments.",
            no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})


# ---- how each verb's result is shown (the function returns it; --json prints it whole) --------------------------
def _echo(line: str = "", err: bool = False) -> None:
    click.echo(line, err=err)


def _saved(what: str):
    return lambda result, kw: _echo(f"{what} saved to {result}")


def _artifact(result, kw) -> None:
    from .workspace import read_manifest

    _echo(f"{read_manifest(result).get('kind', 'model')} saved to {result}")


def _curated(path, kw) -> None:
    from .progress import report as console

    from .data.dataset import dataset_manifest

    m = dataset_manifest(path)
    for s in m["sources"]:
        console.print(f"{s['name']}: {s['documents_in']:,} in, {s['kept']:,} kept, {s['rejected']:,} rejected "
                      + (f"({', '.join(f'{k} {v}' for k, v in list(s['rejected_by'].items())[:5])})"
                         if s["rejected"] else ""), highlight=False)
    _echo(f"{m['output']['documents']:,} documents, {m['output']['tokens']:,} tokens in {path} ({m['seconds']} s); "
          f"details: fmkit curate report {path}")


def _packed(path, kw) -> None:
    index = json.loads((Path(path) / "index.json").read_text())
    _echo(f"{index['tokens']:,} tokens from {index['documents']:,} documents ({index['dtype']}) in {path}"
          + (f"; skipped: {index['skipped']}" if index["skipped"] else ""))


def _evaluated(run, kw) -> None:
    from .evals.report import print_results

    print_results(run)
    _echo(f"results: {run / 'results.json'}, samples: {run / 'samples.jsonl'}")


def _generated(completions, kw) -> None:
    prompts = kw["prompts"] if isinstance(kw["prompts"], list) else [kw["prompts"]]
    for p, c in zip(prompts, completions):
        _echo(p + c.text)
        _echo(f"--- [{len(c.tokens)} tokens, {c.finish_reason}, {c.dtype}]", err=True)


def _indexed(s, kw) -> None:
    _echo(f"{s['documents']} documents ({s['changed']} new or changed, {s['unchanged']} unchanged): "
          f"{s['added']} chunks added, {s['removed']} replaced, {s['chunks']} in {s['index']}")
    if s["skipped"]:
        names = ", ".join(src for src, _ in s["skipped_files"][:5]) + (", ..." if len(s["skipped_files"]) > 5 else "")
        _echo("skipped: " + ", ".join(f"{n} {why}" for why, n in s["skipped"].items()) + f" ({names})", err=True)


def _answered(r, kw) -> None:
    _echo(r["answer"] + "\n")
    for c in r["chunks"]:
        _echo(f"[{c['rank']}] {c['source']} (chunk {c['chunk']})  fused {c['score']:.4f}  "
              f"bm25 #{c['bm25_rank'] or '-'}  dense #{c['dense_rank'] or '-'}")
    if r["invalid_citations"]:
        _echo(f"warning: the answer cites {', '.join(f'[{n}]' for n in r['invalid_citations'])}, which name no "
              "retrieved chunk", err=True)


def _predicted(rows, kw) -> None:
    for text, (label, p) in zip(kw["texts"], rows):
        _echo(f"{label}\t{p:.3f}\t{text}")


def _registry(reg, kw) -> None:
    from rich.table import Table

    from .progress import report

    table = Table(title=f"artifacts in {reg['registry']}")
    for col in ("id", "kind", "path", "derived from"):
        table.add_column(col)
    for a in reg["artifacts"]:
        table.add_row(a["id"], a["kind"], a["path"], ", ".join(a["parents"]))
    report.print(table)
    runs = Table(title="runs")
    for col in ("id", "status", "error"):
        runs.add_column(col)
    for r in reg["runs"]:
        runs.add_row(r["id"], r["status"], r["error"] or "")
    report.print(runs)


SHOW = {
    "curate run": _curated,
    "curate report": lambda r, kw: _echo(f"report: {r[0]} and {r[1]}"),
    "curate ngrams": lambda r, kw: _echo(f"n-gram index written to {r}"),
    "tokenizer train": _saved("tokenizer"),
    "pack": _packed,
    "pretrain": _saved("model"),
    "finetune": _artifact,
    "dpo": _artifact,
    "reward": _artifact,
    "rl": _artifact,
    "classify train": _saved("classifier"),
    "classify predict": _predicted,
    "merge": _saved("merged model"),
    "rag index": _indexed,
    "rag ask": _answered,
    "eval run": _evaluated,
    "eval report": lambda r, kw: _echo(f"report: {r}"),
    "generate": _generated,
    "registry": _registry,
    "monitor run": lambda r, kw: _show_from("fmkit.select.monitor", "show_run")(r, kw),
    "monitor report": lambda r, kw: _show_from("fmkit.select.monitor", "show_report")(r, kw),
    **{f"scale {name}": lambda r, kw, name=name: _show_from("fmkit.scale.show", f"show_{name}")(r, kw)
       for name in ("plan", "run", "fit", "check", "emergence")},
}


def _show_from(module: str, name: str):
    """A verb's own show function, imported when it is needed (the CLI starts without the stages)."""
    import importlib

    return getattr(importlib.import_module(module), name)


def show(verb: Verb, result, kw) -> None:
    """Print a verb's result for a person (quickstart and chat print as they go, and return nothing to show)."""
    if verb.name in SHOW:
        SHOW[verb.name](result, kw)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        code = app.main(prog_name="fmkit", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help())
        code = 0
    except click.UsageError as e:   # a mistake on the command line: one line, like any other user mistake
        where = e.ctx.command_path if e.ctx else "fmkit"
        click.echo(f"error: {e.format_message()} (see `{where} --help`)", err=True)
        code = 2
    except click.Abort:             # Ctrl-C outside training (which saves a checkpoint and says so)
        code = 130
    except FmkitError as e:
        click.echo(f"error: {e}", err=True)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)
