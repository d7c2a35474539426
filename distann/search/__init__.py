"""Search: the opened Index, list-major planning, list reading and boundary checks."""
