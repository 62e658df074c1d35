"""Data in: scan a source, decode defensively, dedupe, validate with Great Expectations, publish, version with DVC."""
