"""Reserved for issue 11's distributed benchmark (not written yet).

Cases go here as asv classes like the other modules: parameterised by ``impl`` (multixent and the
native loss in the same run), ``time_*`` per pass, ``peakmem_*`` with a ``peakmem_baseline`` or
``track_*`` for memory. ``report.py`` renders them in its ``distributed`` section
(``section_distributed``), which today prints only when such results exist.
"""
