"""Experiment drivers: the grids and recorded runs behind the notebooks, kept apart from the methods.

Covers: one module per notebook that needs more than its live cells can
afford (`exp02_lottery`, ...), each with the settings of its recorded run,
the function that records it into `benchmarks/full/`, and a command line
(`python -m chapter11.experiments.exp02_lottery --help`). Drivers import
the core and the method modules; nothing outside this package imports them.
But: most notebooks' drivers still live in their method modules; they move
here one by one.
"""

MIN_RECORDED_SEEDS = 8  # fewer seeds do not settle a comparison that three live seeds could not


def seeds_from_command_line(doc: str, default: int, argv=None) -> list[int]:
    """`--seeds N` (default `default`, at least 8) from a driver's command line, as seeds 0..N-1.

    >>> seeds_from_command_line("Demo.", 12, ["--seeds", "9"])
    [0, 1, 2, 3, 4, 5, 6, 7, 8]
    """
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=default, help=f"number of seeds, from 0 (default {default})")
    args = parser.parse_args(argv)
    if args.seeds < MIN_RECORDED_SEEDS:
        parser.error(f"--seeds must be at least {MIN_RECORDED_SEEDS}: fewer do not settle the comparison")
    return list(range(args.seeds))
