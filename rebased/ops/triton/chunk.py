"""An alias of tiles.py, only while chunk_states.py still imports _rows and _scores from here: delete it once
that import reads rebased.ops.triton.tiles."""

from rebased.ops.triton.tiles import _rows, _scores

__all__ = ["_rows", "_scores"]
