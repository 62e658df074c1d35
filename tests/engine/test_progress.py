"""The per-epoch progress lines (`ssl_models/progress.py`): format, rate and ETA."""

from __future__ import annotations

from sslflow.ssl_models.progress import EpochLines, duration, epoch_line


def test_duration_is_short() -> None:
    assert [duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_lines_give_epoch_loss_knn_rate_and_eta() -> None:
    now = [100.0]
    out: list[str] = []
    lines = EpochLines(epochs=4, start_epoch=1, write=out.append, clock=lambda: now[0])  # resumed after epoch 1
    now[0] += 30
    lines(2, {"epoch": 2, "loss": 4.12345, "lr": 0.1}, images=2000, train_seconds=25.0)
    now[0] += 30
    lines(3, {"epoch": 3, "loss": 3.9, "knn_top1": 56.304}, images=2000, train_seconds=20.0)
    now[0] += 40
    lines(4, {"epoch": 4, "loss": 3.8}, images=0, train_seconds=0.0)
    assert out == ["epoch 2/4  loss 4.1235  80 img/s  ETA 1m00s",       # 2 epochs left at 30 s each
                   "epoch 3/4  loss 3.9000  kNN 56.30  100 img/s  ETA 30s",
                   "epoch 4/4  loss 3.8000  done in 1m40s"]


def test_epoch_zero_is_the_random_init() -> None:
    assert epoch_line(0, 40, {"epoch": 0, "knn_top1": 35.4, "knn_top5": 80.0}) == "epoch 0/40  kNN 35.40 (random init)"
