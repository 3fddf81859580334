"""fusion-adaptive: data-driven, test-time-adaptive and mixture-of-experts fusion methods.

Every method is written once against the model-adapter protocol of
:mod:`fusion_core.adapters` and runs on any pool that implements it.
"""

__version__ = "0.1.0"
