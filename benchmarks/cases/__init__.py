"""The benchmark cases, run by asv (``benchmark_dir`` of ``../asv.conf.json``).

One module per subject: ``cross_entropy`` (time and memory against the native losses, every
framework), ``options`` (memory per option at the acceptance point), ``linear``
(``linear_cross_entropy`` fused vs naive), ``distributed`` (reserved for issue 11). ``report.py``
turns asv's results JSON into ``results/results.md`` and the plots.
"""
