"""Built-in methods: just enough to test the core alone (real methods live in plugins)."""

from __future__ import annotations

from ..components import Capabilities, Method
from ..hookspecs import hookimpl


class Dummy(Method):
    """Return the base model unchanged (or the first model when the pool has no base)."""

    name = "dummy"
    summary = "Return the base model unchanged (a smoke test for pools and task pools)."
    from_paper = False
    capabilities = Capabilities(output="model")

    def run(self, pool, ctx):
        return pool.load_model(None) if pool.has_base else pool.load_model(pool.model_names[0])


@hookimpl
def fusion_register_methods(register):
    register(Dummy)
