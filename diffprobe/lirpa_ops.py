"""Operators auto_LiRPA 0.3 cannot bound, added through its custom-operator registry.

Erf (how both of torch's ONNX exporters write GELU): erf is S-shaped like tanh (convex below 0,
concave above, saturating at -1 and 1, derivative 2/sqrt(pi) exp(-x^2)), so auto_LiRPA's own
tangent-line relaxation of S-shaped functions, given erf and its derivative, bounds it soundly.
"""
import math

import torch


def register(lirpa):
    from auto_LiRPA.operators.activation import BoundTanh

    class BoundErf(BoundTanh):
        def __init__(self, attr, inputs, output_index, options):
            super(BoundTanh, self).__init__(attr, inputs, output_index, options)
            self.precompute_relaxation("erf", torch.erf, self.derf)
            self.alpha_batch_dim = 3

        def forward(self, x):
            return torch.erf(x)

        @staticmethod
        def derf(x):
            return 2 / math.sqrt(math.pi) * torch.exp(-x * x)

        def bound_relax(self, x):
            self.bound_relax_impl(x, torch.erf, self.derf)

    lirpa.register_custom_op("onnx::Erf", BoundErf)
