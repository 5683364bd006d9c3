"""Step-level PPO with process rewards (LPR, Jiao et al. 2024) on Ray Train + DeepSpeed (`train.loop`).

Per PPO iteration:

- Rollout: `samples_per_question` trajectories per question from the **rollout actor** (a `PolicyActor` pool that
  gets the trainer's weights after every optimizer step, as in `train.latro`: `train.rollouts`, push by rank 0,
  barrier).
- Steps: the response split at `step_delimiter` ("\\n\\n", kept). The PRM pool (`prm:`, a `PRMActor` pool, e.g.
  toy:prm) scores each step prefix; rewards per response token:
  -kl_coef (0.1) x (log pi - log pi_ref) on every token, plus, at each step's last token, the PRM's score of that
  prefix clipped to +-`reward_clip` (5); with `outcome_reward`, the last step's reward is the outcome (1 right,
  0 wrong) instead of its PRM score.
- GAE over the response tokens with gamma 1, lambda 0.95; returns = advantages + values; advantages whitened over
  the batch (`whiten_advantages`, as TRL/OpenRLHF; ALGORITHMS.md does not say what LPR does).
- `ppo_epochs` (2) optimizer steps on the same rollouts: PPO's clipped policy loss (clip 0.2) and clipped value
  loss (value clip 0.2, `vf_coef` 0.5 x max of the squared errors of the clipped and unclipped values).

Models: the actor and the frozen reference start from `model` (LPR: the DPO model); under ZeRO-3 the reference is
its own DeepSpeed engine without an optimizer, partitioned as the actor is (`train.rollouts`). The critic is the
PRM's trunk (`critic_model`, default the PRM checkpoint, loaded as its base transformer) with a fresh scalar head
(LPR's critic is bounded to [0,1] while returns exceed 1: a scalar head is not). Actor and critic train in one
DeepSpeed engine (`ActorCritic`); the critic's learning rate is `critic_lr_scale` x train.lr (LPR: actor 1e-6,
critic 5e-7), through the loop's `TrainTask.lr_scale`. The export (`hf/`, `output`) is the actor alone; the critic goes to `hf/critic/`.

Simplifications, said here: a PPO iteration consumes one micro batch of questions and reuses its rollouts for the
next `ppo_epochs - 1` optimizer steps (the questions of those micro batches are skipped), so train.grad_accum must
be 1; tokens are re-tokenized from the text (prompt + response), as in `train.latro`; the policy and the critic
must share the tokenizer (Qwen2.5-Math and its PRM do; so do the toy models).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from app.config import Config
from app.pool_config import PoolConfig, PRMPoolConfig
from train.loop import TrainConfig, fit_and_export
from train.records import read_jsonl
from train.rollouts import RolloutTask, start_rollout_pool
from train.rollouts import rollout_share  # noqa: F401 (train.ppo.rollout_share, as before)
from train.sft import ToyData, load_tokenizer_for

FIELDS = {"question": str, "answer": object}  # what every question record needs (the PRM reads the question)


class PPOConfig(Config):
    """A `job: ppo` recipe. Defaults: LPR's step-PPO (kl 0.1, reward clip 5, GAE gamma 1 lambda 0.95, clip 0.2,
    value clip 0.2, 2 PPO epochs, actor lr 1e-6, critic lr 5e-7)."""

    job: Literal["ppo"] = "ppo"
    model: str = Field("toy:policy", description="the actor, the reference and the rollout actor's start (LPR: the "
                       "DPO model)")
    prm: PRMPoolConfig = Field(default_factory=PRMPoolConfig, description="the reward PRM pool (step scores)")
    critic_model: str | None = Field(None, description="the critic's trunk; default: prm.model")
    data: str = Field("toy:train", description="toy:train, or JSONL records: question, answer[, prompt]")
    toy: ToyData = Field(default_factory=lambda: ToyData(n_per_level=200, levels=[1, 2, 3, 4, 5]))
    samples_per_question: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(320, ge=1)
    step_delimiter: str = "\n\n"
    kl_coef: float = Field(0.1, ge=0, description="per-token KL penalty (LPR 0.1)")
    reward_clip: float = Field(5.0, gt=0, description="PRM step rewards clipped to +-this (LPR 5)")
    outcome_reward: bool = Field(False, description="the last step's reward is the outcome (1/0) (LPR variant)")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0, description="PPO ratio clip")
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    ppo_epochs: int = Field(2, ge=1, description="optimizer steps per rollout batch (LPR 2)")
    whiten_advantages: bool = True
    critic_lr_scale: float = Field(0.5, gt=0, description="critic lr / actor lr (LPR 5e-7 / 1e-6)")
    rollout: PoolConfig | None = Field(None, description="the rollout pool; default one HF replica of `model`")
    sync_bucket_mb: float = Field(512, gt=0)
    eval_toy_per_level: int = Field(0, ge=0)
    output: str | None = None
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(name="ppo", lr=1e-6, micro_batch_size=4,
                                                                   warmup_steps=0))

    @model_validator(mode="after")
    def _accum(self):
        if self.train.grad_accum != 1:
            raise ValueError("train.grad_accum: ppo takes one micro batch per optimizer step (use more questions per "
                             "micro batch instead)")
        return self


# --- the estimator (pure functions: tested against hand computations) ---------------------------------------------

def gae(rewards, values, mask, gamma: float, lam: float):
    """GAE over the masked (response) positions of each row: (advantages, returns), both (B, T). The value after
    the last response token is 0; positions outside the mask get 0."""
    import torch

    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_v = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m + last * (1 - m)
        adv[:, t] = last * m
        next_v = values[:, t] * m + next_v * (1 - m)
    return adv, (adv + values) * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(logp, old_logp, adv, mask, clip: float):
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-c, 1+c)), and the clipped share."""
    import torch

    ratio = torch.exp(logp - old_logp)
    losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    clipped = ((ratio - 1).abs() > clip).to(logp.dtype)
    return masked_mean(losses, mask), masked_mean(clipped, mask)


def value_loss(values, old_values, returns, mask, clip: float):
    """0.5 x mean over tokens of max((v - R)^2, (v_clipped - R)^2), v_clipped = old + clip(v - old, -c, c)."""
    vc = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(((values - returns) ** 2).max((vc - returns) ** 2), mask)


# --- models -------------------------------------------------------------------------------------------------------

def _actor_critic_class():
    import torch

    class ActorCritic(torch.nn.Module):
        """The actor (a causal LM) and the critic (a trunk + a scalar head) in one module, for one DeepSpeed engine.
        `save_pretrained` writes the actor (the critic under critic/), which is what the loop's export calls."""

        def __init__(self, policy, trunk):
            super().__init__()
            self.policy, self.trunk = policy, trunk
            self.value_head = torch.nn.Linear(trunk.config.hidden_size, 1)
            torch.nn.init.normal_(self.value_head.weight, std=1.0 / (trunk.config.hidden_size + 1))
            torch.nn.init.zeros_(self.value_head.bias)
            self.config = policy.config

        def forward(self, input_ids, attention_mask):
            logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            h = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            return logits, self.value_head(h).squeeze(-1)

        def gradient_checkpointing_enable(self, **kw):
            self.policy.gradient_checkpointing_enable(**kw)
            self.trunk.gradient_checkpointing_enable(**kw)

        def save_pretrained(self, out, state_dict=None, **kw):
            from pathlib import Path

            def part(prefix):
                return None if state_dict is None else {k[len(prefix):]: v for k, v in state_dict.items()
                                                         if k.startswith(prefix)}

            self.policy.save_pretrained(out, state_dict=part("policy."), **kw)
            critic = Path(out) / "critic"
            self.trunk.save_pretrained(critic, state_dict=part("trunk."), **kw)
            import torch as _t

            head = part("value_head.") or {k: v for k, v in self.value_head.state_dict().items()}
            _t.save({k: v.detach().cpu() for k, v in head.items()}, critic / "value_head.pt")

    return ActorCritic


def policy_state(state: dict | None) -> dict | None:
    return None if state is None else {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}


class PPOTask(RolloutTask):
    def __init__(self, cfg: PPOConfig, pool=None, prm_pool=None):
        self.cfg, self.pool, self.prm_pool = cfg, pool, prm_pool
        self.step, self._calls, self._cache = 0, 0, None

    def build_tokenizer(self):
        return load_tokenizer_for(self.cfg.model)

    def build_policy(self):
        """The actor as it starts (also the frozen reference), dropout off."""
        import torch
        from transformers import AutoModelForCausalLM

        from app.toy import resolve_model
        from train.dpo import disable_dropout

        policy = AutoModelForCausalLM.from_pretrained(resolve_model(self.cfg.model), dtype=torch.float32)
        disable_dropout(policy)
        return policy

    def build_model(self):
        import torch
        from transformers import AutoModel

        from app.toy import resolve_model
        from train.dpo import disable_dropout

        policy = self.build_policy()
        trunk = AutoModel.from_pretrained(resolve_model(self.cfg.critic_model or self.cfg.prm.model),
                                          dtype=torch.float32)
        model = _actor_critic_class()(policy, trunk)
        disable_dropout(model)
        return model

    def lr_scale(self, name: str) -> float:
        return 1.0 if name.startswith("policy.") else self.cfg.critic_lr_scale

    def load_examples(self, tokenizer):
        """toy:train, or JSONL records with `question` (what the PRM reads) and `answer`, and optionally a rendered
        `prompt` (else the chat template of the question, as `train.latro` with prompt_format chat)."""
        from train.latro import toy_records

        if self.cfg.data == "toy:train":
            from app.toy.world import toy_problems

            t = self.cfg.toy
            probs = toy_problems("train", n_per_level=t.n_per_level, levels=t.levels, seed=t.seed)
            recs = [dict(r, question=p.question) for r, p in zip(toy_records(t), probs)]
        else:
            recs = read_jsonl(self.cfg.data, FIELDS, key="data")
        return self.examples_of(recs, tokenizer)

    def source(self) -> str | None:
        return None if self.cfg.data == "toy:train" else self.cfg.data

    def record_spec(self) -> dict:
        return {"required": FIELDS, "why": " (every question needs one)"}

    def examples_of(self, recs, tokenizer) -> list[dict]:
        """`idx`: the record's number here; under Ray Data ingest its row in the whole data set (`train.ingest`)."""
        from train.latro import LaTROConfig, render_prompt

        shape = LaTROConfig(prompt_format="chat", cot_suffix="")
        out = []
        for i, r in enumerate(recs):
            prompt = render_prompt(r, shape, tokenizer)
            out.append({"input_ids": tokenizer(prompt)["input_ids"], "prompt": prompt, "question": r["question"],
                        "answer": str(r["answer"]), "idx": i})
        return out

    def collate(self, examples, tokenizer):
        return {k: [e[k] for e in examples] for k in ("prompt", "question", "answer", "idx")}

    def prepare(self, engine, examples, tokenizer, rank, world):
        """The frozen reference: the starting actor (ZeRO-3: its own inference engine, `train.rollouts`)."""
        self.start_rollouts()
        self._ref = self.frozen_reference(engine, self.build_policy, lambda module: module.policy)
        self._tok = tokenizer

    def rollout_state(self, state):
        return policy_state(state)

    # rollouts and rewards
    def make_batch(self, model, batch):
        import torch

        from app.contracts import GenerationRequest
        from app.grading import extract_answer
        from app.search.tree import split_steps

        cfg, tok = self.cfg, self._tok
        n = cfg.samples_per_question
        reqs = [GenerationRequest(p, n=n, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                  seed=self.rollout_seed(i))
                for p, i in zip(batch["prompt"], batch["idx"])]
        groups, rollout_s = self.generate(reqs)
        prm = self.prm_pool.client()
        rows, starts, step_ends, step_rewards = [], [], [], []
        for prompt, question, answer, group in zip(batch["prompt"], batch["question"], batch["answer"], groups):
            trajs = [split_steps(c.text, cfg.step_delimiter) for c in group]
            scores = prm.score(question, trajs)
            for c, steps, sc in zip(group, trajs, scores):
                x = tok(prompt)["input_ids"]
                ends, text = [], prompt
                for s in steps:
                    text += s
                    ends.append(len(tok(text)["input_ids"]) - 1)
                ids = list(tok(text)["input_ids"])
                if c.finish_reason == "eos":
                    ids.append(tok.eos_token_id)
                    ends[-1] = len(ids) - 1
                r = [max(-cfg.reward_clip, min(cfg.reward_clip, float(v))) for v in sc]
                if cfg.outcome_reward:
                    r[-1] = 1.0 if extract_answer(c.text) == answer else 0.0
                rows.append(ids)
                starts.append(len(x))
                step_ends.append(ends)
                step_rewards.append(r)
        T = max(len(r) for r in rows)
        dev = next(model.parameters()).device
        ids = torch.full((len(rows), T), tok.pad_token_id or 0, dtype=torch.long)
        att = torch.zeros((len(rows), T), dtype=torch.long)
        resp = torch.zeros((len(rows), T), dtype=torch.float32)
        score = torch.zeros((len(rows), T), dtype=torch.float32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
            resp[i, starts[i]: len(r)] = 1
            for e, v in zip(step_ends[i], step_rewards[i]):
                if starts[i] <= e < len(r):
                    score[i, e] += v
        ids, att, resp, score = ids.to(dev), att.to(dev), resp.to(dev), score.to(dev)
        with torch.no_grad():
            logits, values = model(ids, att)
            old_logp = token_logps(logits, ids)
            ref_logp = token_logps(self._ref(input_ids=ids, attention_mask=att, use_cache=False).logits, ids)
        # shift to "token t is predicted at position t-1": everything below is over positions 1..T-1
        mask = resp[:, 1:]
        values = values[:, :-1] * mask
        kl = (old_logp - ref_logp) * mask
        rewards = -cfg.kl_coef * kl + score[:, 1:]
        adv, ret = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            mu = masked_mean(adv, mask)
            sd = (masked_mean((adv - mu) ** 2, mask)).sqrt()
            adv = (adv - mu) / (sd + 1e-8) * mask
        return dict(ids=ids, att=att, mask=mask, old_logp=old_logp, old_values=values, adv=adv, ret=ret,
                    metrics={"step_reward": float(score.sum() / len(rows)), "kl": float(kl.sum() / len(rows)),
                             "response_tokens": float(mask.sum() / len(rows)), "rollout_s": rollout_s,
                             "last_step_s": self.last_step_s})

    def loss(self, model, batch):
        if self._calls % self.cfg.ppo_epochs == 0:
            self._cache = self.make_batch(model, batch)
            first = True
        else:
            first = False
        self._calls += 1
        b = self._cache
        logits, values = model(b["ids"], b["att"])
        logp = token_logps(logits, b["ids"])
        pg, clipped = policy_loss(logp, b["old_logp"], b["adv"], b["mask"], self.cfg.clip)
        vf = value_loss(values[:, :-1], b["old_values"], b["ret"], b["mask"], self.cfg.value_clip)
        m = dict(b["metrics"], pg_loss=float(pg.detach()), vf_loss=float(vf.detach()), clipfrac=float(clipped))
        if not first:
            m["rollout_s"] = 0.0  # this step reused the rollouts
        return pg + self.cfg.vf_coef * vf, m

    def evaluate(self, model, tokenizer) -> dict:
        n = self.cfg.eval_toy_per_level
        if not n or self.cfg.train.zero_stage == 3:  # rank 0 alone cannot run a ZeRO-3 model
            return {}
        from train.sft import toy_greedy_accuracy

        return toy_greedy_accuracy(model.policy, tokenizer, n)


def token_logps(logits, ids):
    """log p(token t | before) for t = 1..T-1: (B, T-1)."""
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits[:, :-1].float(), ids[:, 1:])


def check(cfg: PPOConfig) -> None:
    """Without Ray, in well under a second: the data (each record a `question` string and an `answer`, else one
    line naming file, line and field), the models and the PRM pool's config."""
    if cfg.data != "toy:train":
        from train.ingest import check_data

        check_data(cfg.data, {"required": FIELDS, "why": " (every question needs one)"}, cfg.train.ingest)
    from actors.prm import validate_prm_config
    from actors.replicas import check_model

    check_model(cfg.model)
    validate_prm_config(cfg.prm)


def start_pools(cfg: PPOConfig, name: str):
    from actors.prm import start_prm_pool

    pool = start_rollout_pool(cfg, f"{name}-rollout")
    try:
        prm = start_prm_pool(cfg.prm, name=f"{name}-prm")
    except BaseException:
        pool.shutdown()
        raise
    return pool, prm


def train(cfg: PPOConfig, task_class=None):
    check(cfg)
    pool, prm = start_pools(cfg, f"ppo-{cfg.train.name}")
    try:
        return fit_and_export((task_class or PPOTask)(cfg, pool, prm), cfg.train, cfg.job, cfg.output,
                              cfg.save_dtype)
    finally:
        prm.shutdown()
        pool.shutdown()
