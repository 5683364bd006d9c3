"""The learned router (docs/algorithms.md, "Adaptive router"): which search method and budget to spend on a question.

    data.py      search records -> arms (method x N x selection rule), soft labels by bootstrap, costs, the split
    features.py  the encoder (checked by hash), PCA, the scaler, one feature row per (question, arm)
    model.py     the MLP on those rows (torch), trained on the soft labels
    policy.py    the pick: argmax over arms of predicted accuracy - lambda x cost, and the held-out figures that
                 judge it (lambda chosen on validation, against the best fixed arm and the fixed arms' envelope)

`policy.py` imports no torch, transformers or vllm (an import-linter contract), so the decision runs anywhere.
"""
