"""`fmkit rl`: online reinforcement learning from a reward, in the one loop.

Each step draws prompts, samples a group of answers to each with the current policy (rollout.py), scores them
(reward_fns.py: a rule, a reward model, or a Python function run in the sandbox), and takes one policy-gradient
step on group-relative advantages (GRPO's normalised or RLOO's leave-one-out baseline) with a KL penalty to the
frozen starting model: the same weights with the adapter off under LoRA, a frozen copy otherwise. Logged per step:
reward, its spread, KL per answer, entropy, answer length, and whether the KL bound switched the reward term off.
Before and after training the policy answers held-out prompts (same seeds both times), and fmkit.json records
both rewards, the answer-by-answer comparison and the KL reached.

Data: JSONL lines with a `prompt` (a string or messages) or `messages`, and any other fields, which a Python
reward function receives as keyword arguments (`tests` for generated code, ...).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from ..errors import FmkitError
from ..models.build import arch_of, max_positions
from ..progress import status
from .chat_data import BadLine, read_jsonl
from .chat_template import use_template
from .reward_fns import FORMS, resolve_reward
from .rollout import RolloutBatches, Rollouts, heldout, prompt_ids, rl_objective, token_logps
from .training import add_lora, output_dir, parent_name, processes, run_record, save_output, train_config


def _prompt(row) -> tuple[list[dict], object, dict]:
    if not isinstance(row, dict):
        raise BadLine("each line must be a JSON object")
    given = row.get("prompt", row.get("messages"))
    messages = [{"role": "user", "content": given}] if isinstance(given, str) else given
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
            for m in messages):
        raise BadLine("needs a 'prompt' (a string or a list of messages with role and text content) or 'messages'")
    return messages, given, {k: v for k, v in row.items() if k not in ("prompt", "messages")}


def read_prompts(path: str | Path) -> list[tuple[list[dict], object, dict]]:
    """(prompt messages, the prompt as given, the line's other fields) per line."""
    return read_jsonl(path, _prompt, "prompt data", "prompts")


def paired(before: list[float], after: list[float]) -> dict:
    """How many held-out answers scored higher, lower or the same after training than before (answer k of a
    prompt drawn from the same seed both times): the counts a sign test reads."""
    return {"better": sum(a > b for b, a in zip(before, after)), "worse": sum(a < b for b, a in zip(before, after)),
            "same": sum(a == b for b, a in zip(before, after))}


def rl(policy: str | Path, reward: str = "", data: str | Path | None = None, out: str | Path | None = None,
       val_data: str | Path | None = None, holdout: float = 0.1, group: int = 8, batch_size: int = 4,
       max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, beta: float = 0.04,
       kl_max: float = 0.0, advantage: Literal["grpo", "rloo"] = "grpo", lora: bool = False, lora_r: int = 8,
       lora_alpha: int = 16, steps: int = 100, lr: float | None = None, grad_accum: int = 1, eval_samples: int = 4,
       reward_timeout: float = 5.0, seed: int = 0, resume: bool = False, workspace: str | Path | None = None,
       template: str = "chat", base: str | Path | None = None, on_log: Callable[[dict], None] | None = None,
       on_checkpoint: Callable | None = None, **train_kw) -> Path:
    """Train a policy online from a reward: sample groups of answers, score them, and step on group-relative advantages.

    The KL to the starting model is penalised (beta) and can be bounded (kl_max). Held-out prompts are answered
    before and after training; fmkit.json records both mean rewards, the paired comparison and the KL. Returns the
    output folder: a model, or a PEFT adapter with LoRA.

    Args:
        policy: Decoder to train (model or adapter folder, a model's name in the workspace, or hf:ORG/NAME).
        reward: json, length:N (characters), contains:TEXT, a reward model folder from fmkit reward, or a Python
            function FILE.py[:NAME] / MODULE:NAME called as NAME(prompt, answer, **fields), run in the sandbox.
        data: Prompt JSONL: a prompt (string or messages) or messages per line, other fields passed to a Python
            reward (default: one empty prompt, for rewards that judge the answer alone).
        out: Output folder (default <workspace>/models/NAME-rl).
        val_data: Held-out prompt JSONL (default: a --holdout share of DATA; DATA itself when it has one prompt).
        holdout: Share of DATA's prompts held out when --val-data is not given.
        group: Answers sampled per prompt; advantages are relative to the group.
        batch_size: Prompts per micro-batch on each process (each gives GROUP answers).
        max_new_tokens: Longest answer, in tokens.
        temperature: Sampling temperature of the rollouts and the held-out answers.
        top_k: Sample from the k most likely tokens (0: off).
        beta: Weight of the KL penalty to the starting model.
        kl_max: Bound on each answer's KL to the starting model (nats): an answer above it is not reinforced but
            pulled back (0: no bound).
        advantage: grpo (reward minus the group mean, over the group's std) or rloo (minus the others' mean).
        lora: Train a LoRA adapter (the reference is the base without it).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scale = alpha / r).
        steps: Optimizer steps.
        lr: Peak learning rate (default 5e-5 with LoRA, 5e-6 full).
        grad_accum: Micro-batches per optimizer step.
        eval_samples: Answers per held-out prompt, before and after training (0: no held-out evaluation).
        reward_timeout: Seconds a sandboxed Python reward may take per answer.
        seed: Seed for the prompt order, the sampling, the hold-out split and the LoRA initialisation.
        resume: Continue from the newest checkpoint in the output folder.
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).
        template: Chat template: chat (the model's own; fmkit's for fmkit models), fmkit, none, or a .jinja file.
        base: Base model for an adapter given as POLICY (default: the one the adapter names).

    `on_log(record)` and `on_checkpoint(step, model, record)` (Python only) see each logged record and each saved
    checkpoint, as the loop's `train` describes.
    """
    from ..models.reference import resolve
    from ..train.loop import train

    if not reward:
        raise FmkitError(f"rl needs --reward: {FORMS}")
    if group < 2:
        raise FmkitError(f"--group must be at least 2 (advantages are relative to the group), got {group}")
    if max_new_tokens < 1 or temperature <= 0:
        raise FmkitError("rollouts need --max-new-tokens >= 1 and --temperature > 0 (they must sample)")
    d = processes(train_kw.get("device", "auto"), train_kw.get("parallel", "ddp"))
    ref = resolve(policy, base, workspace)
    config = ref.config()
    if arch_of(config) != "decoder":
        raise FmkitError(f"{ref.spec} is not a decoder; rl trains a model that generates text")
    tok = ref.tokenizer()
    used = "none" if template == "none" else use_template(tok, ref, template, plain_ok=True)
    rows = read_prompts(data) if data else [([{"role": "user", "content": ""}], "", {})]
    if val_data:
        held = read_prompts(val_data)
    elif len(rows) == 1:
        held = rows
    elif not 0 < holdout < 1:
        raise FmkitError(f"--holdout must be above 0 and below 1, got {holdout} (or give --val-data)")
    else:
        order = np.random.default_rng(seed).permutation(len(rows))
        cut = max(1, round(len(rows) * holdout))
        rows, held = [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]
    room = max_positions(config) - max_new_tokens
    if room < 1:
        raise FmkitError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{max_positions(config)} positions")
    encode = lambda items: [(prompt_ids(tok, used, m)[-room:], given, f) for m, given, f in items]  # noqa: E731
    prompts, held_prompts = encode(rows), encode(held)
    reward_fn = resolve_reward(reward, workspace, reward_timeout)

    net = ref.load().train()
    shadow = copy.deepcopy(net)
    if lora:
        net = add_lora(net, ["q_proj", "k_proj", "v_proj", "o_proj"], lora_r, lora_alpha, seed)

        def reference(ids, attn):
            with net.disable_adapter():
                return token_logps(net, ids, attn)
    else:
        frozen = copy.deepcopy(net).eval().requires_grad_(False)

        def reference(ids, attn):
            frozen.to(ids.device)
            return token_logps(frozen, ids, attn)
    rollouts = Rollouts(net, shadow, tok, reward_fn, reference, max_new_tokens, temperature, top_k)
    mean_prompt = float(np.mean([len(ids) for ids, _, _ in prompts]))
    cfg = train_config(steps, batch_size, grad_accum, max(8, round(mean_prompt + max_new_tokens)),
                       lr or (5e-5 if lora else 5e-6), seed, **train_kw)
    batches = RolloutBatches(rollouts, prompts, group, cfg.batch_size, cfg.grad_accum, seed, advantage, d.rank,
                             d.world)
    eval_seed = seed + 1_000_003   # held-out answers draw apart from every training step's
    evaluate = (lambda: heldout(rollouts, held_prompts, eval_samples, eval_seed)) if eval_samples and d.main else None
    out = output_dir(out, workspace, f"{ref.label}-rl")
    base_id = ref.manifest().get("id", "")
    run_config = {"policy": ref.spec, "reward": str(reward), "data": str(data) if data else None, "lora": lora,
                  "steps": steps, "group": group, "beta": beta, "kl_max": kl_max}
    with run_record(d, workspace, "rl", run_config, [base_id]) as run:
        started = time.time()
        before = evaluate() if evaluate else None
        result = train(net, rl_objective(beta, kl_max), batches, cfg, out, resume=resume,
                       run_info={"run_id": run.id}, d=d, on_log=on_log, on_checkpoint=on_checkpoint)
        after = evaluate() if evaluate else None
        summary = None
        if before and after:
            summary = {"prompts": len(held_prompts), "answers": after["answers"], "reward_before": before["reward"],
                       "reward_after": after["reward"], "kl_after": after["kl"], "length_before": before["length"],
                       "length_after": after["length"], **paired(before["rewards"], after["rewards"]),
                       "rewards_before": before["rewards"], "rewards_after": after["rewards"]}
            status(f"held-out reward {before['reward']:.3f} -> {after['reward']:.3f} over {after['answers']} answers "
                   f"({summary['better']} better, {summary['worse']} worse); KL {after['kl']:.2f} nats per answer")
        manifest = {"kind": "adapter" if lora else "model", "method": "rl" + (" lora" if lora else ""),
                    "reward": str(reward), "advantage": advantage, "beta": beta, "kl_max": kl_max, "group": group,
                    "max_new_tokens": max_new_tokens, "temperature": temperature, "parent_model": parent_name(ref),
                    "parent_id": base_id or None, "data": str(Path(data).resolve()) if data else None,
                    "prompts": len(prompts), "heldout": summary, "steps": result.step, "template": used,
                    "final_metrics": result.history[-1] if result.history else {},
                    "seconds": round(time.time() - started, 1)}
        return save_output(net, tok, out, manifest, run, [base_id])
