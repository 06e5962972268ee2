"""``python -m gilib.studies STUDY run|TABLE ...``: the one command line of every study."""

from . import all_studies
from .study import main

if __name__ == "__main__":
    raise SystemExit(main(all_studies()))
