"""Grids of the study script's configurations, the library half of the sweep tool
(``python -m lossy_hooks.tools.sweep`` is its command line) and of the experiments that run
configurations: from settings to the script's flags (:mod:`.grid`), one configuration's
folder and its ``torchrun`` launch (:mod:`.launch`), a grid checked before anything runs
(:mod:`.planning`), run here or submitted as submitit jobs (:mod:`.runner`, :mod:`.jobs`),
what is printed about each configuration (:mod:`.report`), and the state of a configuration
folder (:mod:`.config_state`).
"""
