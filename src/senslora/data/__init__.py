"""The data layer: models (aliases, local folders and GGUF files, the hub), calibration data and
tokenised batches, training tasks, and the checks of inputs and outputs (:mod:`.guard`).

Imports only :mod:`senslora.core` besides itself. The names below are the calibration-data API::

    from senslora.data import load_examples, make_batches, sample_examples
"""

from .examples import load_examples, make_batches, sample_examples

__all__ = ["load_examples", "make_batches", "sample_examples"]
