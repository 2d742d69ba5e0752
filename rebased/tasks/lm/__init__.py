"""Language modelling on real text: tokenizers by name (tokenizers.py, fetch.py), corpus readers (sources.py),
corpus -> token shards (data.py, encode.py), the shard reader (shards.py), training and evaluation on them
(train.py, evaluate.py); a tiny public-domain corpus in sample/."""

from pathlib import Path

SAMPLE_DIR = Path(__file__).parent / "sample"  # 13 State of the Union addresses, one .txt file each


class DataError(ValueError):
    """Bad input or a folder that cannot be used as asked; the message names the file and the fix."""
