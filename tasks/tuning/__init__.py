"""Optuna: where a study lives, its objective on held-out data, the search space, the study loop."""
