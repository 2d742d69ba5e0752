"""Data: the MQAR synthetic task (mqar.py)."""

from rebased.data.mqar import (
    IGNORE_INDEX,
    MQARConfig,
    MQARData,
    MQARSlice,
    MQARSplits,
    generate_mqar,
    make_mqar_splits,
    power_law,
)

__all__ = [
    "IGNORE_INDEX",
    "MQARConfig",
    "MQARData",
    "MQARSlice",
    "MQARSplits",
    "generate_mqar",
    "make_mqar_splits",
    "power_law",
]
