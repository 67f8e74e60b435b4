"""Image generation with pixels as tokens: the causal LM module, plus bits/dim under the name the papers use.

The image head (``attnlab.heads``) returns log-probabilities over the 256 values of a token, so the LM module's
cross-entropy is already the exact negative log-likelihood and its ``bits`` is bits/dim (one token per sub-pixel);
this subclass logs it as ``{split}/bits_per_dim`` too (``test/bits_per_dim`` is Tables 1/2 of Katharopoulos et al.).
"""
from __future__ import annotations

from .lm import LMModule


class ImageModule(LMModule):
    def derived(self, values):
        out = super().derived(values)
        out["bits_per_dim"] = out["bits"]
        return out
