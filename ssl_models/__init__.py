"""sslflow's engine: pure PyTorch (no Prefect, no MLflow).

Image store, batched on-device augmentation, backbones, SSL methods and losses, the
training loop with exact-resume checkpoints, and the evaluation protocols.
"""
