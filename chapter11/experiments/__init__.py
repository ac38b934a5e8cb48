"""Experiment drivers: the grids and recorded runs behind the notebooks, kept apart from the methods.

Covers: one module per notebook that needs more than its live cells can
afford (`exp02_lottery`, ...), each with the settings of its recorded run,
the function that records it into `benchmarks/full/`, and a command line
(`python -m chapter11.experiments.exp02_lottery --help`). Drivers import
the core and the method modules; nothing outside this package imports them.
But: most notebooks' drivers still live in their method modules; they move
here one by one.
"""
