"""dmfs benchmark harness: `python bench/run.py` (or `make bench`); see README.md."""
