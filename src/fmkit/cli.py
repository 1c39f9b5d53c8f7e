"""The `fmkit` command: a thin table of verbs over the Python API (each verb is one function call)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import FmkitError

app = typer.Typer(help="fmkit: curate, tokenize, pre-train, adapt, evaluate and serve foundation models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
tokenizer_app = typer.Typer(help="Train byte-level BPE tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")

WORKSPACE = typer.Option(None, "--workspace", "-w", help="Workspace folder (default $FMKIT_WORKSPACE or "
                         "./fmkit-workspace).")


@app.command()
def quickstart(workspace: Optional[Path] = WORKSPACE,
               steps: Optional[int] = typer.Option(None, help="Training steps (default: the tiny recipe's 500)."),
               vocab_size: int = typer.Option(4096, help="Tokenizer vocabulary size.")):
    """Build a tiny foundation model end to end on the local Python standard library (a few minutes on a CPU).

    Trains a tokenizer, packs token shards (a fixed set of stdlib modules held out for validation), pre-trains a
    small Llama-style decoder, reports validation loss / perplexity / bits-per-byte, prints samples, saves a
    loss-curve PNG and lists every artifact. Re-running after Ctrl-C resumes from the last checkpoint.
    """
    from .quickstart import quickstart as run

    run(workspace, steps, vocab_size)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def curate(ctx: typer.Context,
           target: str = typer.Argument(..., metavar="RECIPE.yaml | report DATASET | ngrams DATASET",
                                        help="A curation recipe to run; or `report DATASET` to summarise a "
                                        "dataset; or `ngrams DATASET|SHARDS` to build its contamination index."),
           dataset: Optional[Path] = typer.Argument(None, help="The dataset (or token shards) for report/ngrams."),
           workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Worker processes (default: the "
                                                 "recipe's, 0 = one per core)."),
           fresh: bool = typer.Option(False, "--fresh", help="Ignore finished units of an interrupted run."),
           n: int = typer.Option(13, "--n", help="ngrams: words (or tokens) per n-gram.")):
    """Curate raw sources into a dataset: filter, deduplicate, redact PII, score toxicity, balance domains.

    fmkit curate RECIPE.yaml [--section.key=value ...]: Parquet shards, manifest.json and rejected/.

    fmkit curate report DATASET: the accounting as tables, plus report.png and report.html.

    fmkit curate ngrams DATASET|SHARDS: a 13-gram index for contamination checks.

    An interrupted run continues from its finished units when run again (--fresh starts over).
    """
    from .progress import report as console

    if target in ("report", "ngrams"):
        if dataset is None:
            raise FmkitError(f"fmkit curate {target} needs a DATASET folder")
        if target == "report":
            from .data.report import curate_report

            png, page = curate_report(dataset)
            typer.echo(f"report: {png} and {page}")
        else:
            from .data.contamination import build_ngram_index

            path = build_ngram_index(dataset, n)
            typer.echo(f"{n}-gram index written to {path}")
        return
    from .data.curate import curate as run

    path = run(target, list(ctx.args) + ([str(dataset)] if dataset else []), workers=workers, resume=not fresh)
    import json

    m = json.loads((path / "manifest.json").read_text())
    for s in m["sources"]:
        console.print(f"{s['name']}: {s['documents_in']:,} in, {s['kept']:,} kept, {s['rejected']:,} rejected "
                      + (f"({', '.join(f'{k} {v}' for k, v in list(s['rejected_by'].items())[:5])})"
                         if s["rejected"] else ""), highlight=False)
    typer.echo(f"{m['output']['documents']:,} documents, {m['output']['tokens']:,} tokens in {path} "
               f"({m['seconds']} s); details: fmkit curate report {path}")


@app.command("eval", context_settings={"allow_extra_args": False})
def eval_(target: str = typer.Argument(..., metavar="MODEL | report RUN",
                                       help="A model folder, openai:NAME or anthropic:NAME; or `report RUN`."),
          tasks: List[str] = typer.Argument(None, help="Task YAML files or built-in task names "
                                            "(stdlib_docstring_to_name, humaneval); for report: the run folder."),
          limit: int = typer.Option(0, help="Evaluate the first N items of each task (0: all)."),
          num_fewshot: Optional[int] = typer.Option(None, help="Override each task's few-shot count."),
          batch_size: int = typer.Option(16, help="Local models: sequences per forward pass."),
          base_url: str = typer.Option("", help="OpenAI-compatible server URL (e.g. http://localhost:8000/v1)."),
          api_key: str = typer.Option("", help="API key (default: $OPENAI_API_KEY / $ANTHROPIC_API_KEY)."),
          cache: Optional[Path] = typer.Option(None, help="SQLite response cache for remote models."),
          concurrency: int = typer.Option(4, help="Remote models: requests in flight."),
          prices: Optional[Path] = typer.Option(None, help="Price table YAML for cost accounting."),
          out: Optional[Path] = typer.Option(None, help="Run folder (default <workspace>/evals/MODEL-TIME)."),
          no_contamination: bool = typer.Option(False, "--no-contamination", help="Skip the training-data check."),
          workspace: Optional[Path] = WORKSPACE):
    """Evaluate a model on tasks: results.json (metrics with standard errors) and samples.jsonl (per item).

    fmkit eval MODEL TASK [TASK ...]; fmkit eval report RUN prints the table and writes report.html.
    """
    if target == "report":
        from .evals.report import eval_report

        if not tasks:
            raise FmkitError("fmkit eval report needs the run folder")
        page = eval_report(tasks[0])
        typer.echo(f"report: {page}")
        return
    if not tasks:
        raise FmkitError("name at least one task: a YAML file or a built-in name such as stdlib_docstring_to_name")
    from .evals.report import print_results
    from .evals.runner import evaluate

    kw = {"base_url": base_url, "api_key": api_key, "cache": cache, "concurrency": concurrency, "prices": prices} \
        if ":" in target and not Path(target).exists() else {}
    run = evaluate(target, tasks, out=out, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                   workspace=workspace, contamination=not no_contamination, **kw)
    print_results(run)
    typer.echo(f"results: {run / 'results.json'}, samples: {run / 'samples.jsonl'}")


TEMPLATE = typer.Option("chat", help="How conversations become text: chat (the model's own chat template; fmkit's "
                        "for fmkit models without one), fmkit (role headers), none (texts back to back), or a "
                        ".jinja file.")


@app.command()
def finetune(model: Path = typer.Argument(..., help="Base model folder (fmkit's or any transformers causal LM)."),
             data: Path = typer.Argument(..., help="Chat JSONL ({\"messages\": [...]}) or prompt/completion JSONL."),
             out: Optional[Path] = typer.Option(None, help="Output folder (default <workspace>/models/NAME-lora|ft)."),
             lora: bool = typer.Option(False, "--lora", help="Train a LoRA adapter instead of all weights."),
             qlora: bool = typer.Option(False, "--qlora", help="LoRA on the base loaded in 4-bit NF4 "
                                        "(bitsandbytes; GPU if there is one, else CPU)."),
             lora_r: int = typer.Option(8, help="LoRA rank."),
             lora_alpha: int = typer.Option(16, help="LoRA alpha (scale = alpha / r)."),
             target: List[str] = typer.Option([], "--target", help="LoRA target module; repeatable "
                                              "(default q_proj k_proj v_proj o_proj)."),
             steps: int = typer.Option(100, help="Optimizer steps."),
             lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 2e-4 LoRA, 3e-5 full)."),
             batch_size: int = typer.Option(8, help="Examples per micro-batch."),
             grad_accum: int = typer.Option(1, help="Micro-batches per step."),
             max_len: int = typer.Option(0, help="Token limit per example (default: the model's context)."),
             on_long: str = typer.Option("truncate", help="Examples over max-len: truncate or drop (counted)."),
             val_data: Optional[Path] = typer.Option(None, help="Held-out JSONL for validation loss."),
             seed: int = typer.Option(0, help="Seed for example order."),
             resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
             template: str = TEMPLATE,
             workspace: Optional[Path] = WORKSPACE):
    """Fine-tune a model (full or LoRA) on chat data, with the loss on assistant replies only.

    The data is validated first; problems are listed as file:line. Uses the same training loop as pretrain
    (checkpoints, --resume, metrics.jsonl, TensorBoard).
    """
    from .adapt.finetune import finetune as run

    path = run(model, data, out, lora=lora, qlora=qlora, lora_r=lora_r, lora_alpha=lora_alpha,
               lora_targets_=list(target) or None, steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
               max_len=max_len, on_long=on_long, val_data=val_data, seed=seed, resume=resume, workspace=workspace,
               template=template)
    typer.echo(f"{'adapter' if lora or qlora else 'model'} saved to {path}")


@app.command()
def dpo(model: Path = typer.Argument(..., help="Model folder to align (usually after SFT)."),
        data: Path = typer.Argument(..., help="Preference JSONL: prompt/chosen/rejected, or OpenAI's preference "
                                    "format (input, preferred_output, non_preferred_output)."),
        out: Optional[Path] = typer.Option(None, help="Output folder (default <workspace>/models/NAME-dpo)."),
        beta: float = typer.Option(0.1, help="DPO beta: how far the policy may move from the reference."),
        lora: bool = typer.Option(False, "--lora", help="Train a LoRA adapter (the reference is the base)."),
        steps: int = typer.Option(100, help="Optimizer steps."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 5e-5 LoRA, 5e-6 full)."),
        batch_size: int = typer.Option(4, help="Pairs per step."),
        seed: int = typer.Option(0, help="Seed for pair order."),
        template: str = TEMPLATE,
        workspace: Optional[Path] = WORKSPACE):
    """Direct Preference Optimization on chosen/rejected pairs; logs reward accuracy and margins."""
    from .adapt.dpo import dpo as run

    path = run(model, data, out, beta, lora, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
               workspace=workspace, template=template)
    typer.echo(f"{'adapter' if lora else 'model'} saved to {path}")


@app.command()
def classify(encoder: str = typer.Argument(..., help="Encoder folder, or `minilm` for the packaged all-MiniLM-L6-v2."),
             data: Path = typer.Argument(..., help="JSONL with text and label fields."),
             out: Optional[Path] = typer.Option(None, help="Output folder."),
             lora: bool = typer.Option(False, "--lora", help="LoRA on the encoder (head trained in full)."),
             steps: int = typer.Option(100, help="Optimizer steps."),
             lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 1e-3 LoRA, 5e-5 full)."),
             batch_size: int = typer.Option(16, help="Examples per step."),
             workspace: Optional[Path] = WORKSPACE):
    """Train a classification head on an encoder (full or LoRA); predict with fmkit.adapt.classify.predict."""
    from .adapt.classify import train_classifier

    typer.echo(f"classifier saved to {train_classifier(encoder, data, out, lora, steps=steps, lr=lr, batch_size=batch_size, workspace=workspace)}")


@app.command()
def merge(adapter: Path = typer.Argument(..., help="LoRA adapter folder (fmkit finetune --lora)."),
          out: Path = typer.Argument(..., help="Where to write the merged model folder."),
          base: Optional[Path] = typer.Option(None, help="Base model (default: the one the adapter names).")):
    """Fold a LoRA adapter into its base model, giving a plain model folder."""
    from .adapt.finetune import merge as run

    typer.echo(f"merged model saved to {run(adapter, out, base)}")


rag_app = typer.Typer(help="Retrieval-augmented generation over local documents.", no_args_is_help=True)
app.add_typer(rag_app, name="rag")
RAG_INDEX = typer.Option(None, "--index", help="Index folder (default: rag/ in the workspace).")


@rag_app.command("index")
def rag_index(docs: Path = typer.Argument(..., help="A file, or a folder of .txt/.md/.rst/.html documents."),
              index: Optional[Path] = RAG_INDEX,
              meta: List[str] = typer.Option([], "--meta", help="key=value stored on every chunk; repeatable."),
              chunk_tokens: int = typer.Option(256, help="Encoder tokens per chunk."),
              overlap: int = typer.Option(32, help="Tokens shared by neighbouring chunks."),
              encoder: Optional[Path] = typer.Option(None, help="A local encoder folder (default: the index's own, "
                                                     "or the bundled all-MiniLM-L6-v2).")):
    """Chunk, embed and store documents; running it again updates only new and changed documents."""
    from .adapt.rag import default_index_dir, index as run, parse_pairs

    index = index or default_index_dir()
    s = run(docs, index, chunk_tokens, overlap, encoder, parse_pairs(meta, "--meta"))
    typer.echo(f"{s['documents']} documents ({s['changed']} new or changed, {s['unchanged']} unchanged): "
               f"{s['added']} chunks added, {s['removed']} replaced, {s['chunks']} in {index}")
    if s["skipped"]:
        names = ", ".join(src for src, _ in s["skipped_files"][:5]) + (", ..." if len(s["skipped_files"]) > 5 else "")
        typer.echo("skipped: " + ", ".join(f"{n} {why}" for why, n in s["skipped"].items()) + f" ({names})", err=True)


@rag_app.command("ask")
def rag_ask(question: str = typer.Argument(..., help="The question."),
            index: Optional[Path] = RAG_INDEX,
            k: int = typer.Option(5, "--k", help="Chunks to retrieve."),
            filters: List[str] = typer.Option([], "--filter", help="key=value: only chunks with this metadata; "
                                              "repeat a key to allow several values."),
            model: Optional[str] = typer.Option(None, "--model", help="Model folder (or openai:NAME, "
                                                "anthropic:NAME) that writes a cited answer; without it the top "
                                                "chunk is the answer."),
            as_json: bool = typer.Option(False, "--json", help="Print the whole result as JSON.")):
    """Answer a question from the index: hybrid BM25 + dense retrieval, answer with [n] citations."""
    import json

    from .adapt.rag import ask as run, default_index_dir, parse_pairs

    generate = None
    if model:
        from .providers import get_model

        generate = get_model(model)
    r = run(index or default_index_dir(), question, k, parse_pairs(filters, "--filter"), generate)
    if as_json:
        typer.echo(json.dumps(r, indent=2, ensure_ascii=False))
        return
    typer.echo(r["answer"] + "\n")
    for c in r["chunks"]:
        typer.echo(f"[{c['rank']}] {c['source']} (chunk {c['chunk']})  fused {c['score']:.4f}  "
                   f"bm25 #{c['bm25_rank'] or '-'}  dense #{c['dense_rank'] or '-'}")
    if r["invalid_citations"]:
        typer.echo(f"warning: the answer cites {', '.join(f'[{n}]' for n in r['invalid_citations'])}, which name no "
                   "retrieved chunk", err=True)


@tokenizer_app.command("train")
def tokenizer_train(corpus: str = typer.Argument(..., help="stdlib, stdlib:train, a folder, a text file or JSONL."),
                    out: Optional[Path] = typer.Option(None, help="Output folder (default <workspace>/tokenizers/NAME)."),
                    vocab_size: int = typer.Option(8192, help="Vocabulary size, special tokens included."),
                    sentinels: int = typer.Option(32, help="Span-corruption sentinel tokens to reserve (T5)."),
                    max_bytes: int = typer.Option(0, help="Train on the first N bytes of text only (0: all)."),
                    workspace: Optional[Path] = WORKSPACE):
    """Train a byte-level BPE tokenizer; the folder loads with transformers.AutoTokenizer."""
    from .tokenize.tokenizer import train_tokenizer

    path = train_tokenizer(corpus, out, vocab_size, sentinels, max_bytes=max_bytes, workspace=workspace)
    typer.echo(f"tokenizer saved to {path}")


@app.command()
def pack(corpus: str = typer.Argument(..., help="stdlib, stdlib:train, stdlib:val, a folder, a text file or JSONL."),
         tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer folder (fmkit tokenizer train)."),
         out: Optional[Path] = typer.Option(None, help="Output folder (default <workspace>/shards/NAME)."),
         shard_tokens: int = typer.Option(50_000_000, help="Tokens per shard file."),
         workspace: Optional[Path] = WORKSPACE):
    """Tokenize a corpus into flat uint16/uint32 token shards with index.json (read with np.memmap)."""
    from .tokenize.pack import pack as run

    path = run(corpus, tokenizer, out, shard_tokens, workspace=workspace)
    import json

    index = json.loads((path / "index.json").read_text())
    typer.echo(f"{index['tokens']:,} tokens from {index['documents']:,} documents ({index['dtype']}) in {path}"
               + (f"; skipped: {index['skipped']}" if index["skipped"] else ""))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def pretrain(ctx: typer.Context,
             recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (sections: data, model, train)."),
             resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the "
                                         "output folder, exactly where it stopped.")):
    """Pre-train a model from token shards: fmkit pretrain RECIPE.yaml [--section.key=value ...].

    Any recipe key can be overridden, e.g. --train.steps=2000 --train.lr=3e-4 --model.preset=10m
    --data.shards=PATH. Under torchrun it trains with DDP (default) or FSDP2 (--train.parallel=fsdp).
    """
    from .train.pretrain import pretrain as run

    overrides = list(ctx.args)
    if recipe is not None and str(recipe).startswith("--"):  # no recipe file: the first override landed here
        overrides, recipe = [str(recipe)] + overrides, None
    path = run(recipe, overrides, resume=resume)
    typer.echo(f"model saved to {path}")


@app.command()
def generate(model: str = typer.Argument(..., help="Model reference: a model or adapter folder, or hf:ORG/NAME."),
             prompt: List[str] = typer.Option(["def "], "--prompt", "-p", help="Prompt; repeat for a batch."),
             max_new_tokens: int = typer.Option(64, help="Tokens to generate per prompt."),
             temperature: float = typer.Option(0.8, help="Sampling temperature; 0 is greedy."),
             top_k: int = typer.Option(0, help="Sample from the k most likely tokens (0: off)."),
             top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1.0: off)."),
             stop: List[str] = typer.Option([], "--stop", help="Stop when this string appears; repeatable."),
             seed: int = typer.Option(0, help="Sampling seed."),
             dtype: str = typer.Option("auto", help="auto, fp32 or bf16. auto: bf16 on CPUs that multiply bf16 "
                                       "natively (about twice as fast), else fp32 (exact)."),
             trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow pickle weights (can run code).")):
    """Generate text from a model with a KV cache."""
    from .models.generate import Generator

    stop = [s.encode().decode("unicode_escape") for s in stop]  # let users type --stop '\n\n'
    gen = Generator(model, dtype, trust_pickle)
    if gen.fast is not None and gen.fast.native is None:
        from .models.native import why_not
        typer.echo(f"note: decoding steps run in PyTorch, slower: {why_not() or 'unsupported model layout'}", err=True)
    for p, c in zip(prompt, gen(prompt, max_new_tokens, temperature, top_k, top_p, stop, seed)):
        typer.echo(p + c.text)
        typer.echo(f"--- [{len(c.tokens)} tokens, {c.finish_reason}, {gen.dtype}]", err=True)


@app.command()
def registry(kind: Optional[str] = typer.Option(None, help="Only artifacts of this kind (tokenizer, shards, model)."),
             workspace: Optional[Path] = WORKSPACE):
    """List the workspace's artifacts and runs with their lineage."""
    from rich.table import Table

    from .progress import report
    from .workspace import Workspace

    ws = Workspace(workspace)
    table = Table(title=f"artifacts in {ws.db_path}")
    for col in ("id", "kind", "path", "derived from"):
        table.add_column(col)
    for a in ws.artifacts(kind):
        table.add_row(a["id"], a["kind"], a["path"], ", ".join(ws.lineage(a["id"])))
    report.print(table)
    runs = Table(title="runs")
    for col in ("id", "status", "error"):
        runs.add_column(col)
    for r in ws.runs():
        runs.add_row(r["id"], r["status"], r["error"] or "")
    report.print(runs)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        app()
    except FmkitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
