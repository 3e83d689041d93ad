"""Training data (package; the module is being split): re-exports train.data.load."""

from train.data.load import *  # noqa: F401,F403 - the public API of the former train/data.py
from train.data.load import _read_rows  # noqa: F401 - train/loops/reward.py reads raw rows with it
