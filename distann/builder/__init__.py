"""Build: pure planning (plan.py), worker tasks (tasks.py) and the Dask driver (driver.py)."""
