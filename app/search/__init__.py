"""Search methods over steps against a verifier: greedy, majority, best-of-N, beam search, DVTS, REBASE, MCTS.

`app.search.registry.METHODS` maps a method name to (config class, solve function); `app.search.record` turns one
problem into the per-problem results record; `app.search.results` writes, reads and summarises the records.
No torch, transformers or vllm here: methods talk to PolicyHandle / RewardHandle objects.
"""


def __getattr__(name: str):
    if name in ("METHODS", "get_method", "method_config"):
        from app.search import registry as methods

        return getattr(methods, name)
    raise AttributeError(name)
