"""The training layer: ``train`` and ``evaluate_run`` (:mod:`.train`), the fine-tuning methods
(:mod:`.methods`), evaluation metrics, the training options, and the layer / data selection
pre-steps (:mod:`.cka`, :mod:`.quality`).

Imports only :mod:`senslora.core` and :mod:`senslora.data` besides itself.
"""
