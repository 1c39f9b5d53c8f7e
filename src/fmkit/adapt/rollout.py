"""Rollouts for `fmkit rl`: a group of answers per prompt sampled from the current policy with fmkit's fast
generation, scored, and collated into what the policy-gradient objective trains on.

Exact resume. The loop's contract is that the batch for a step is a pure function of the seed and the step; a
rollout also depends on the policy, so here it is a pure function of (seed, step, the policy's weights at that
step). Sampling draws from its own generator seeded by (seed, step, part), never from the global RNG, and the
weights at a step are exactly what the loop's checkpoint restores; so a resumed run samples the same answers as
a straight one and ends with the same weights, and nothing more needs checkpointing. (A Python reward whose
result depends on time, such as one that hits its time limit only sometimes, is the exception: it is outside
what a seed can fix.)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..models.generate import Generator
from ..train.data import StepBatches
from .chat_template import encode_chat, encode_plain


def prompt_ids(tok, template: str, messages: list[dict]) -> list[int]:
    """The tokens a reply to `messages` follows, as the fine-tuning verbs encode a conversation: fmkit's role
    headers piece by piece, a model's own template with its generation prompt, or texts back to back (`none`)."""
    if template == "none":
        ids = encode_plain(tok, messages)[0]
    elif template.startswith("fmkit"):
        ids = encode_chat(tok, messages)[0] + tok("<|assistant|>\n", add_special_tokens=False)["input_ids"]
    else:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids or [tok.eos_token_id]


@torch.no_grad()
def plain_weights(net) -> dict:
    """The policy's weights as a plain model's state dict, LoRA deltas added, without touching the policy (merging
    in place and back would leave rounding in the base weights)."""
    if not hasattr(net, "get_base_model"):
        return net.state_dict()
    inner = net.get_base_model()
    out = {}
    for name, module in inner.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            weight = module.base_layer.weight
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter)
            out[f"{name}.weight"] = weight
    for key, value in inner.state_dict().items():
        if "lora_" not in key:
            out.setdefault(key.replace(".base_layer.", "."), value)
    return out


def token_logps(model, ids: torch.Tensor, attn: torch.Tensor, entropy: bool = False):
    """Log-probability of each next token (B, T-1), and with `entropy` the entropy of each next-token distribution."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, -1)
    lp = logp_all.gather(-1, ids[:, 1:, None])[..., 0]
    return (lp, -(logp_all.exp() * logp_all).sum(-1)) if entropy else lp


def kl_per_answer(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) of each answer in nats, summed over its tokens: Schulman's k3 estimator
    exp(r) - r - 1 with r = log ref - log policy, unbiased for samples from the policy and never negative."""
    r = ref - logp
    return ((r.exp() - r - 1) * mask).sum(-1)


def advantages(rewards: torch.Tensor, group: int, kind: str) -> torch.Tensor:
    """Group-relative advantages: GRPO's (r - group mean) / group std, or RLOO's r - mean of the group's others."""
    r = rewards.view(-1, group)
    centred = r - r.mean(-1, keepdim=True)
    if kind == "rloo":
        return (centred * group / (group - 1)).flatten()
    std = r.std(-1, keepdim=True)
    return torch.where(std > 0, centred / std.clamp(min=1e-8), torch.zeros_like(centred)).flatten()


def rl_objective(beta: float, kl_max: float = 0.0):
    """Policy gradient on group-relative advantages, one update per rollout (so the PPO ratio is 1 and needs no
    clipping), averaged over answer tokens, plus beta x the per-token KL to the reference.

    `kl_max` (> 0) bounds each answer's KL: an answer above it is not reinforced whatever its reward, and its KL
    counts in full (weight 1, not beta), so it pulls the policy back toward the reference. Bounding answers, not
    the batch mean, leaves the mean KL under the bound with a margin; and the decision uses the batch alone, so
    resume stays exact. (Dropping only the reward term of a whole batch was tried first: Adam's momentum carried
    the KL on past the bound for several steps.)"""
    def objective(model, batch: dict):
        mask = batch["mask"][:, 1:]
        logp, ent = token_logps(model, batch["input_ids"], batch["attention_mask"], entropy=True)
        n = mask.sum().clamp(min=1)
        r = batch["ref_logps"] - logp
        kl_tok = (r.exp() - r - 1) * mask
        kl = kl_tok.detach().sum(-1)
        over = (kl > kl_max).float() if kl_max > 0 else torch.zeros_like(kl)
        pg = -(batch["advantages"] * (1 - over))[:, None] * logp * mask
        loss = (pg + (beta + (1 - beta) * over)[:, None] * kl_tok).sum() / n
        return loss, {"reward": float(batch["reward"].mean()), "reward_std": float(batch["reward"].std()),
                      "kl": float(kl.mean()), "entropy": float((ent.detach() * mask).sum() / n),
                      "length": float(mask.sum(-1).mean()), "kl_capped": float(over.mean()),
                      "reward_failed": float(batch["failed"].float().mean())}
    return objective


class Rollouts:
    """Samples and scores answers with the policy's current weights: `shadow`, a plain model of the policy's
    shape (a copy taken before any LoRA was added), is refreshed from the policy when asked and runs fmkit's
    generation (the KV-cache decoder for Llama-style models). `reference(ids, attn)` gives the frozen reference's
    token log-probabilities."""

    def __init__(self, net, shadow, tok, reward_fn, reference, max_new_tokens: int, temperature: float,
                 top_k: int = 0):
        self.net, self.shadow, self.tok, self.reward_fn, self.reference = net, shadow.eval(), tok, reward_fn, reference
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.gen = None

    def refresh(self) -> None:
        self.shadow.load_state_dict(plain_weights(self.net))
        self.gen = Generator.from_model(self.shadow, self.tok, dtype="fp32")

    def sample(self, encoded: list[list[int]], seed: int) -> list[tuple[list[int], str]]:
        gen = torch.Generator().manual_seed(seed)
        if self.gen.fast is not None:
            return self.gen.generate_ids(encoded, self.max_new_tokens, self.temperature, self.top_k, 1.0,
                                         self.tok.eos_token_id, None, gen)
        out = []   # other architectures: transformers' generate, one prompt at a time, its RNG forked from ours
        for e in encoded:
            with torch.random.fork_rng():
                torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
                seq = self.shadow.generate(torch.tensor([e]), max_new_tokens=self.max_new_tokens, do_sample=True,
                                         temperature=self.temperature, top_k=self.top_k or None,
                                         pad_token_id=self.pad)[0, len(e):].tolist()
            eos = self.tok.eos_token_id
            out.append((seq[:seq.index(eos)], "stop") if eos in seq else (seq, "length"))
        return out

    def __call__(self, prompts: list, group: int, seed: int, kind: str = "grpo") -> dict:
        """A batch of len(prompts) x group answers: token ids, masks, rewards, advantages, reference log-probs.
        `prompts` are (prompt ids, prompt as given, other fields)."""
        encoded = [ids for ids, _, _ in prompts for _ in range(group)]
        done = self.sample(encoded, seed)
        eos = self.tok.eos_token_id
        seqs = [(e, t + ([eos] if why == "stop" else [])) for e, (t, why) in zip(encoded, done)]
        answers = [self.tok.decode(t) for t, _ in done]
        given = [p for _, p, _ in prompts for _ in range(group)]
        fields = [f for _, _, f in prompts for _ in range(group)]
        rewards = torch.tensor(self.reward_fn(given, answers, fields), dtype=torch.float32)
        failed = torch.isnan(rewards)
        rewards = torch.nan_to_num(rewards, nan=0.0)
        width = max(len(e) + len(t) for e, t in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width))
        for r, (e, t) in enumerate(seqs):
            ids[r, :len(e) + len(t)] = torch.tensor(e + t)
            attn[r, :len(e) + len(t)] = 1
            mask[r, len(e):len(e) + len(t)] = 1
        device = next(self.net.parameters()).device
        with torch.no_grad():
            ref = self.reference(ids.to(device), attn.to(device)).cpu()
        return {"input_ids": ids, "attention_mask": attn, "mask": mask, "reward": rewards, "failed": failed,
                "advantages": advantages(rewards, group, kind), "ref_logps": ref, "answers": answers,
                "tokens": ids}


class RolloutBatches(StepBatches):
    """Step-indexed rollouts: the step's prompts drawn from (seed, step), each rank's share sampled `group` times
    with the policy's weights at that step (module docstring: why resume is still exact)."""

    def __init__(self, rollouts: Rollouts, prompts: list, group: int, batch_size: int, grad_accum: int, seed: int,
                 advantage: str = "grpo", rank: int = 0, world: int = 1):
        super().__init__(batch_size, grad_accum, seed, rank, world)
        self.rollouts, self.prompts, self.group, self.advantage = rollouts, prompts, group, advantage
        self.synced = None   # the step whose weights the rollout copy holds

    @property
    def tokens_per_step(self) -> int:
        prompt = float(np.mean([len(ids) for ids, _, _ in self.prompts]))
        return round(self.global_batch * self.group * (prompt + self.rollouts.max_new_tokens))

    def sampling_seed(self, step: int, micro: int) -> int:
        return int(np.random.default_rng([self.seed, step, self.part(micro)]).integers(1 << 62))

    def get(self, step: int, micro: int) -> dict:
        if self.synced != step:
            self.rollouts.refresh()
            self.synced = step
        picked = self.share(self.draw(step, len(self.prompts)), micro).tolist()
        batch = self.rollouts([self.prompts[i] for i in picked], self.group, self.sampling_seed(step, micro),
                              self.advantage)
        batch.pop("answers")
        return batch


def heldout(rollouts: Rollouts, prompts: list, samples: int, seed: int) -> dict:
    """Reward and KL of `samples` answers per held-out prompt under the policy's current weights. Answer k of a
    prompt always draws from the same seed, so two calls (before and after training) pair answer by answer."""
    rollouts.refresh()
    rewards, kls, lengths = [], [], []
    for i, p in enumerate(prompts):
        b = rollouts([p], samples, seed + i)
        device = next(rollouts.net.parameters()).device
        with torch.no_grad():
            logp = token_logps(rollouts.net, b["input_ids"].to(device), b["attention_mask"].to(device)).cpu()
        rewards += b["reward"].tolist()
        kls += kl_per_answer(logp, b["ref_logps"], b["mask"][:, 1:]).tolist()
        lengths += b["mask"].sum(-1).tolist()
    mean = lambda xs: float(np.mean(xs)) if xs else math.nan   # noqa: E731
    return {"reward": mean(rewards), "kl": mean(kls), "length": mean(lengths), "answers": len(rewards),
            "rewards": rewards}
