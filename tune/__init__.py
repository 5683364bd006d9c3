"""Ray Tune sweeps over test-time compute budgets (`sweep.py`) and the compute-optimal frontier (`frontier.py`).

Imports flow `jobs -> tune -> train -> actors -> app`: this layer may use every layer to its right.
"""
