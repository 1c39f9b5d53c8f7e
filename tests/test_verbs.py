"""The verb table: every verb has --help, the same parameter names and defaults as its Python function, help for
each parameter, --workspace, an export in `fmkit`, and an entry in the README and the docs."""
import inspect
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import fmkit
from fmkit.cli import app, cli_kind, command, parse_doc
from fmkit.verbs import GROUPS, VERBS

ROOT = Path(__file__).resolve().parents[1]
NAMES = [v.name for v in VERBS]


def test_every_verb_is_declared_once_and_exported():
    assert len(NAMES) == len(set(NAMES))
    for v in VERBS:
        assert getattr(fmkit, v.python_name) is v.function
        assert v.python_name in fmkit.__all__
    assert {v.group for v in VERBS if v.group} == set(GROUPS)


@pytest.mark.parametrize("name", NAMES)
def test_help_names_and_defaults_match_the_function(name):
    verb = next(v for v in VERBS if v.name == name)
    result = CliRunner().invoke(app, [*name.split(), "--help"])
    assert result.exit_code == 0 and "Usage" in result.output, result.output
    fn = verb.function
    cmd = command(verb)
    on_cli = {p.name: p for p in cmd.params if p.name != "json_output"}
    summary, helps = parse_doc(fn.__doc__)
    assert summary and summary.splitlines()[0].endswith("."), f"{name}: a one-line summary"
    import typing

    hints = typing.get_type_hints(fn)
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name == verb.overrides:
            continue
        if cli_kind(hints.get(p.name, str)) is None:   # Python-only (a callable, an object): needs a default
            assert p.default is not p.empty, f"{name}: {p.name} has no command-line form and no default"
            continue
        assert p.name in on_cli, f"{name}: {p.name} is not on the command line"
        assert helps.get(p.name), f"{name}: {p.name} has no line in the docstring's Args"
        cli_default = on_cli[p.name].default
        if p.default is p.empty:
            assert on_cli[p.name].required or isinstance(on_cli[p.name], click.Argument)
        elif isinstance(cli_default, tuple):
            assert list(cli_default) == list(p.default or ()) if not isinstance(p.default, str) else \
                cli_default == (p.default,)
        else:
            assert cli_default == p.default, f"{name}: --{p.name} defaults to {cli_default}, not {p.default}"
    assert set(on_cli) <= set(inspect.signature(fn).parameters)


@pytest.mark.parametrize("name", NAMES)
def test_every_verb_takes_a_workspace(name):
    verb = next(v for v in VERBS if v.name == name)
    params = inspect.signature(verb.function).parameters
    assert "workspace" in params, f"{name} takes no --workspace"
    opt = next(p for p in command(verb).params if p.name == "workspace")
    assert "-w" in opt.opts or "-w" in opt.secondary_opts


def test_sub_verbs_are_reached_one_way():
    runner = CliRunner()
    for group in GROUPS:
        out = runner.invoke(app, [group, "--help"])
        assert out.exit_code == 0
        for v in VERBS:
            if v.group == group:
                assert v.name.split()[1] in out.output
    # a group's default verb runs without its name, and with it
    assert "RECIPE" in runner.invoke(app, ["curate", "run", "--help"]).output
    assert runner.invoke(app, ["curate", "no-such-recipe.yaml"]).exit_code != 0


@pytest.mark.parametrize("name", NAMES)
def test_each_verb_has_readme_and_docs_entries(name):
    readme = (ROOT / "README.md").read_text()
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    assert f"fmkit {name}" in readme or f"`{name}`" in readme, f"README lists no `fmkit {name}`"
    assert re.search(rf"fmkit {re.escape(name)}\b", docs), f"no docs/ page shows `fmkit {name}`"


def test_json_prints_the_result(tmp_path):
    out = CliRunner().invoke(app, ["registry", "-w", str(tmp_path), "--json"])
    assert out.exit_code == 0
    import json

    doc = json.loads(out.output)
    assert doc["registry"].endswith("registry.db") and doc["artifacts"] == []


@pytest.mark.parametrize("args, message", [
    (["pack", "stdlib"], "Missing argument 'TOKENIZER'"),
    (["generate", "m", "--dtype", "fp16"], "'fp16' is not one of 'auto', 'fp32', 'bf16'"),
    (["finetune", "m", "d.jsonl", "--no-such-flag"], "No such option '--no-such-flag'"),
    (["rag", "index", "docs", "idx", "--meta", "lang"], "--meta takes key=value"),
])
def test_command_line_mistakes_are_one_line(args, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fmkit", *args], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        proc.stderr
