"""The benchmark layer: the harness that expands a YAML config into runs (:mod:`.harness`), the
cost probes (:mod:`.profiling`), the 8B cost projection and the report.

Imports only :mod:`senslora.core`, :mod:`senslora.data` and :mod:`senslora.training` besides itself.
"""
