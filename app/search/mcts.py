"""MCTS over steps with PRM values (OpenR `vanila_mcts`).

    expand(root)
    for path in range(num_sequence):
        node = root
        loop:
            node = argmax_c PUCT(node, c)                      # Q(c) + P(c) sqrt(N) / (1 + N_c) (c_init + ln((N + c_base + 1) / c_base))
            if node is terminal (EOS) or at the depth cap: break
            if node is a leaf: expand(node)                    # dead end (no usable child): break
        v = node.Q (or its initial PRM value while unvisited)
        for every node on the path, root included: N += 1, W += v      # no random rollouts
        paths += node
    expand(node): sample tree_max_width next steps; keep those that stopped on the delimiter or at EOS, non-empty
        and distinct; prior = exp(mean token logprob) renormalised over the siblings; initial value = the PRM score
        of the child's last step; a child is terminal if it ended at EOS.

Defaults as OpenR: tree_max_width 4, tree_max_depth 50, temperature 0.7, top_p 1.0, max_new_tokens 2048 (per step),
pb_c_base 19652, pb_c_init 1.25, num_sequence 1 (paths; the method's N for selection).

ponder differs on purpose: besides the per-step max_new_tokens, max_tokens can bound the whole trajectory (a path
whose budget is spent ends there, unfinished; the default, max_new_tokens x tree_max_depth, is OpenR's bound); priors are uniform when the engine gives no logprobs; a node whose
expansion keeps no child becomes a dead end (the path ends there, unfinished) instead of an error. Paths that
end on the same node give the same trajectory twice, as in OpenR. Each problem runs in its own task; expansions of
concurrent problems meet in the policy actor's batches (OpenR batches expansion levels across problems itself).
"""
from __future__ import annotations

import math

from pydantic import Field

from app.contracts import PolicyHandle, RewardHandle
from app.search.sampling import SearchConfig, derive_seed, problem_key, require_prm, sample, score_paths, step_from
from app.search.tree import Node, Trajectory


class MCTSConfig(SearchConfig):
    num_sequence: int = Field(1, ge=1, description="number of paths (simulations), each ending in a trajectory (N)")
    tree_max_width: int = Field(4, ge=1, description="next steps sampled per expansion")
    tree_max_depth: int = Field(50, ge=1, description="depth cap (steps)")
    temperature: float = Field(0.7, ge=0.0, description="sampling temperature")
    max_new_tokens: int = Field(2048, ge=1, description="tokens per sampled step")
    max_tokens: int = Field(
        2048 * 50, ge=1, description="generated-token budget of a whole trajectory (default: max_new_tokens x depth cap, OpenR's bound)"
    )
    pb_c_base: float = Field(19652.0, gt=0.0, description="PUCT c_base")
    pb_c_init: float = Field(1.25, ge=0.0, description="PUCT c_init")

    @property
    def budget(self) -> int:
        return self.num_sequence


def puct(parent: Node, child: Node, cfg: MCTSConfig) -> float:
    """Q(c) + P(c) * sqrt(N_parent) / (1 + N_c) * (c_init + ln((N_parent + c_base + 1) / c_base))."""
    pb_c = math.log((parent.visits + cfg.pb_c_base + 1) / cfg.pb_c_base) + cfg.pb_c_init
    pb_c *= math.sqrt(parent.visits) / (child.visits + 1)
    return child.value + pb_c * child.prior


def select_child(node: Node, cfg: MCTSConfig) -> Node:
    """The child with the largest PUCT score (ties: the first)."""
    best, best_u = node.children[0], puct(node, node.children[0], cfg)
    for c in node.children[1:]:
        u = puct(node, c, cfg)
        if u > best_u:
            best, best_u = c, u
    return best


def backup(node: Node, value: float) -> None:
    """Add the leaf value to W and 1 to N of every node from `node` up to the root."""
    n: Node | None = node
    while n is not None:
        n.visits += 1
        n.value_sum += value
        n = n.parent


def expand(
    node: Node, problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle, cfg: MCTSConfig,
    key: object, problem: str | None = None,
) -> None:
    """Sample the node's children. Every call stops on the delimiter, so a kept completion is one step (the
    delimiter can only end it: one stop rule). `problem` (default: the question) and `key` seed the request."""
    problem = question if problem is None else problem
    left = cfg.max_tokens - node.tokens
    if left <= 0:
        node.terminal = True
        return
    [group] = sample(
        policy, [problem_prompt + node.text], [cfg.tree_max_width], max_tokens=min(cfg.max_new_tokens, left),
        temperature=cfg.temperature, top_p=cfg.top_p, stop=(cfg.step_delimiter,),
        seeds=[derive_seed(cfg.seed, problem, "mcts", key)], logprobs=True,
    )
    kept, seen = [], set()
    for c in group:
        if c.finish_reason not in ("stop", "eos") or c.text == "" or c.text in seen:
            continue
        seen.add(c.text)
        kept.append(c)
    if not kept:
        node.terminal = True  # a dead end: no usable next step
        return
    raw = [math.exp(c.mean_logprob) if c.mean_logprob is not None else None for c in kept]
    if any(p is None for p in raw):
        raw = [1.0] * len(kept)
    total = sum(raw)  # type: ignore[arg-type]
    children = [
        node.add_child(step_from(c), prior=p / total, terminal=c.finish_reason == "eos", finished=c.finish_reason == "eos")  # type: ignore[operator]
        for c, p in zip(kept, raw)
    ]
    for child, s in zip(children, score_paths(prm, question, [c.step_texts for c in children])):
        child.scores = s
        child.initial_value = s[-1]


def solve(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: MCTSConfig,
    problem_id: str | None = None,
) -> list[Trajectory]:
    return search(problem_prompt, question, policy, prm, cfg, problem_id)[1]


def search(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: MCTSConfig,
    problem_id: str | None = None,
) -> tuple[Node, list[Trajectory]]:
    """The search itself: returns the tree's root (with its statistics) and one trajectory per path.

    `problem_id` keys the request seeds (default: the question text).
    """
    prm = require_prm(prm, "mcts")
    problem = problem_key(question, problem_id)
    root = Node()
    expand(root, problem_prompt, question, policy, prm, cfg, key=("root",), problem=problem)
    out: list[Trajectory] = []
    if not root.children:
        return root, out
    for i in range(cfg.num_sequence):
        node = root
        while True:
            node = select_child(node, cfg)
            if node.terminal or node.depth >= cfg.tree_max_depth:
                break
            if node.is_leaf():
                expand(node, problem_prompt, question, policy, prm, cfg, key=(i, node.depth), problem=problem)
                if not node.children:
                    break
        backup(node, node.value)
        out.append(node.to_trajectory())
    return root, out
