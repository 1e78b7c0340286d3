"""Summary statistics with numpy. The import below runs once per zygote, not per call."""

import os

import numpy as np

LOADED_IN = os.getpid()


def stats(event, ctx):
    xs = np.asarray(event if isinstance(event, list) else [event], dtype=float)
    return {
        "mean": float(xs.mean()),
        "std": float(xs.std()),
        "numpy_loaded_in_zygote": os.getppid() == LOADED_IN,
    }
