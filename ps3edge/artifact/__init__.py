"""The artifact layer, at the bottom of ps3edge: what an artifact directory is and how it is
written. Stage declarations (spec.py), the checked immutable manifest (manifest.py, checked by checks.py) with its
optional sections (engines.py, precisions.py), VILA-HD's vila.json (vila.py), the shapes the
stages accept (profiles.py), the weights an artifact names (weights.py), atomic writes and
hashing (io.py), and the one-writer lock (lock.py)."""
