"""Training steps: pretrain and evaluate an encoder (the engine behind settings and stores), DVC exports."""
