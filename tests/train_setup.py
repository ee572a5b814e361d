"""The training tests' metrics reader (the tiny run they train is the package's: train/tiny_run.py)."""
import json
from pathlib import Path


def metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in path.read_text().splitlines()]
