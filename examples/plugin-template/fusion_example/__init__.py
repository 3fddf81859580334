"""fusion-example: a template plugin registering one merge method."""

from __future__ import annotations

import attrs

import fusion_core
from fusion_core import Capabilities, KernelMethod, option


@attrs.frozen
class MedianConfig:
    use_base: bool = option(False, help="Take the median of task vectors and add it to the base instead of the weights.")


class Median(KernelMethod):
    """Element-wise median of the fine-tuned models (robust to one outlier among three)."""

    # Names are global across every installed plugin: prefix yours with your plugin's name, so a copy
    # of this template (installed next to it) cannot clash with it.
    name = "example_median"
    summary = "Element-wise median of the models (or of their task vectors with use_base)."
    Config = MedianConfig
    reference_url = "https://en.wikipedia.org/wiki/Median"
    capabilities = Capabilities(needs_base=False)
    elementwise = True

    def kernel(self, name, base, tensors, ctx):
        import torch

        stacked = torch.stack(list(tensors))
        if self.config.use_base:
            if base is None:
                from fusion_core import InputError

                raise InputError("example_median: use_base=true needs a base model")
            return base + torch.quantile(stacked - base, 0.5, dim=0)
        # quantile interpolates for an even count (mean of the two middle values)
        return torch.quantile(stacked, 0.5, dim=0)


@fusion_core.hookimpl
def fusion_register_methods(register):
    register(Median)
