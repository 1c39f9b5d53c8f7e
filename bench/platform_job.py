"""How long the platform's acceptance program takes: upload a chat file, fine-tune, use the fine-tuned model.

    python bench/platform_job.py [--conversations 100] [--epochs 3] [--full] [--model FOLDER]

Model: FOLDER, else the trained quickstart model ($FMKIT_WORKSPACE or ./fmkit-workspace, models/quickstart), else
the reference 16M Llama of bench/serve_throughput.py (random weights, a 50304-token stdlib tokenizer), served as
`gpt-4o-mini` by fmkit.Server in this process with a fresh workspace. The data: --conversations support
conversations (system, user, assistant) in OpenAI's chat fine-tuning format. What is timed, with the openai SDK
over HTTP: the upload (validated as it arrives), create → running (file validation, the queue, the worker
process starting), running → succeeded (the worker loading the model and training), and the first chat on the
ft: model (hot-loading the adapter onto its base). Also: steps, trained tokens, training tokens/s from the
job's metrics events.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def conversations(n: int) -> str:
    rows = [{"messages": [{"role": "system", "content": "You are a support agent for an online shop."},
                          {"role": "user", "content": f"My order {1000 + i} has not arrived yet. What can I do?"},
                          {"role": "assistant", "content": f"I am sorry about order {1000 + i}. I have checked it: "
                           "it left our warehouse yesterday and should arrive within two days."}]} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--model", help="model folder (default: the quickstart model, else the reference model)")
    args = ap.parse_args()

    import openai

    import fmkit
    from common import machine
    from serve_throughput import find_quickstart, make_reference, with_chat_template

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            folder, what = with_chat_template(Path(args.model), tmp / "model"), args.model
        elif (qs := find_quickstart()) is not None:
            folder, what = with_chat_template(qs, tmp / "model"), "the quickstart model"
        else:
            folder, what = make_reference(tmp), "the reference 16M model (random weights)"
        data = tmp / "support_conversations.jsonl"
        data.write_text(conversations(args.conversations))
        with fmkit.Server(names={"gpt-4o-mini": str(folder)}, workspace=str(tmp / "ws")) as url:
            client = openai.OpenAI(base_url=url, api_key="none")
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=1,
                                           messages=[{"role": "user", "content": "hi"}])
            t0 = time.time()
            file = client.files.create(file=open(data, "rb"), purpose="fine-tuning")
            t_upload = time.time()
            job = client.fine_tuning.jobs.create(training_file=file.id, model="gpt-4o-mini",
                                                 hyperparameters={"n_epochs": args.epochs},
                                                 extra_body={"lora": not args.full})
            t_running = None
            while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed",
                                                                                    "cancelled"):
                if job.status == "running" and t_running is None:
                    t_running = time.time()
                time.sleep(0.1)
            t_done = time.time()
            if job.status != "succeeded":
                sys.exit(f"the job {job.status}: {job.error}")
            reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=16, temperature=0,
                                                   messages=[{"role": "user", "content": "My order 1003 has not "
                                                              "arrived yet. What can I do?"}])
            t_chat = time.time()
            metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=1000) if e.type == "metrics"]
            steps = max(e.data["step"] for e in metrics)
            span = max(e.created_at for e in metrics) - min(e.created_at for e in metrics)
        print(f"platform acceptance job on {what}, {machine()}")
        print(f"  {args.conversations} conversations, {args.epochs} epochs, "
              f"{'full' if args.full else 'LoRA'}, batch size {job.hyperparameters.batch_size}: {steps} steps, "
              f"{job.trained_tokens:,} trained tokens")
        print(f"  upload (validated)          {t_upload - t0:7.2f} s")
        print(f"  create -> running           {(t_running or t_done) - t_upload:7.2f} s")
        print(f"  running -> succeeded        {t_done - (t_running or t_done):7.2f} s   (training "
              f"~{job.trained_tokens / max(span, 1):,.0f} tok/s over {span} s of metrics events)")
        print(f"  upload -> succeeded         {t_done - t0:7.2f} s")
        print(f"  first chat on the ft model  {t_chat - t_done:7.2f} s   ({reply.choices[0].message.content!r})")


if __name__ == "__main__":
    main()
