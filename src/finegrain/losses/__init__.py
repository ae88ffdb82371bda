"""Losses: uncertainty weighting, batch-hard triplet, distillation; DML losses come from
pytorch-metric-learning."""
