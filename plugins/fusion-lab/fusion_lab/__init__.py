"""fusion-lab: the experiment platform of fusion (results database, ``fuse bench``, ``fuse sweep``, executors)."""
