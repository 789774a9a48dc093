"""The experiments: the studies of docs/results.md, each run as
``python -m lossy_hooks.experiments.<study>``: perplexity under loss (:mod:`.lm_study`),
time to accuracy on the simulated clock (:mod:`.time_study`, its placement part
:mod:`.time_placement`, what both share :mod:`.time_runs`), fidelity per technique
(:mod:`.technique_study`), every placement at scale (:mod:`.placement_study`, its time on
the clock :mod:`.placement_clock`). An experiment imports the library and
:mod:`lossy_hooks.study` (configurations run through
:func:`lossy_hooks.study.sweeping.launch.run_config`), never a tool.
"""
