"""MLflow: the backend and its outages, one run per training, figures, the registry and the promotion gate."""
