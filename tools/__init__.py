"""Dataset tools built on data_util: the synthetic scene renderer, the nearest-neighbour baseline, the
COLMAP import and the command line that runs them (``python -m tools.dataset --help``)."""
