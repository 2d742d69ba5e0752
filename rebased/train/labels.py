"""The label convention every task, the trainer and the evaluators share."""

IGNORE_INDEX = -100  # an unlabelled position: not scored, and what cross_entropy(ignore_index=...) skips
