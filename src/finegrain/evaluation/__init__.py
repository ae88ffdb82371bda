"""Evaluation metrics as pure functions (arrays in, numbers out), one module per task.

- :mod:`.classification`: top-k accuracy;
- :mod:`.reid`: CMC / mAP / mINP (Market-1501 protocol), k-reciprocal re-ranking, thresholds;
- :mod:`.revisited`: ROxford5k / RParis6k (+1M) mAP and mP@k with revisitop's conventions;
- :mod:`.dml`: Recall@K, MAP@R, NMI.

Metric keys and ranges follow the project contract: fractions in [0, 1], keys ``top1``,
``cmc``/``mAP``/``mINP``, ``R@K``/``MAP@R``/``NMI``, ``{"easy"|"medium"|"hard": {...}}``.
"""

from . import classification, dml, reid, revisited
from .classification import accuracy

__all__ = ["accuracy", "classification", "dml", "reid", "revisited"]
