"""The models a monitor is tested on (tests/test_monitor.py, bench/monitor_power.py): a tiny Llama, the same weights
after one optimizer step, and a LoRA adapter on it; and swapping what a `--models-dir` server serves."""
from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

from conftest import save_fmkit_llama

PROMPTS = ["def main():", "The quick brown fox", "import os\nimport sys", "class Parser:", "Return the sum of",
           "for i in range("]
TRAIN_TEXT = ("def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, item):\n"
              "        self.items.append(item)\n")


def write_suite(path: Path) -> Path:
    """Text canaries, each scored by an assertion that a sampled output passes about half the time."""
    path.write_text("".join(json.dumps({"input": p, "assert": [{"contains": "e"}]}) + "\n" for p in PROMPTS))
    return path


def tiny_model(tokenizer_dir, folder: Path) -> Path:
    """The tests' tiny Llama with its (tied) embeddings scaled up 4x: a random 64-wide model is otherwise nearly
    uniform over its vocabulary, and sampled text from it would look the same whatever the weights."""
    from safetensors.torch import load_file, save_file

    save_fmkit_llama(tokenizer_dir, folder, 256)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v * 4 if "embed" in k else v for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def one_step(model: Path, out: Path, lr: float = 1e-4) -> Path:
    """The same weights after one AdamW step of next-token training on a little code (a fine-tuning step)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fmkit.models.io import load_tokenizer

    shutil.copytree(model, out, copy_function=shutil.copy)
    net = AutoModelForCausalLM.from_pretrained(model)
    ids = torch.tensor([load_tokenizer(model).encode(TRAIN_TEXT)])
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    net(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    net.save_pretrained(out)
    return out


def lora(model: Path, out: Path, std: float = 0.05) -> Path:
    """A rank-4 LoRA adapter on q_proj and v_proj of `model`, with small random B matrices (a changed model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fmkit.models.io import load_tokenizer
    from fmkit.workspace import write_manifest

    torch.manual_seed(3)
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules=["q_proj",
                                                                                                       "v_proj"]))
    for name, p in net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
    net.save_pretrained(out)
    load_tokenizer(model).save_pretrained(out)
    write_manifest(out, {"kind": "adapter", "parent_model": str(model)})
    return out


def swap(models_dir: Path, name: str, source: Path, urls: list[str]) -> None:
    """Serve `source` as `name` from now on: its files replace the folder's, and each server unloads the old model
    (the admin route; with no keys every request may use it)."""
    target = models_dir / name
    shutil.rmtree(target)
    shutil.copytree(source, target, copy_function=shutil.copy)
    for url in urls:
        req = urllib.request.Request(f"{url}/models/{name}/unload", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=60).close()
