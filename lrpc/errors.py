"""Errors lrpc raises. Each names what went wrong and where (op, node, module path, shape)."""

from __future__ import annotations


class LRPCError(Exception):
    """Base class of every error lrpc raises on purpose."""


class TraceError(LRPCError):
    """``torch.export`` could not trace the model into an aten graph."""


class UnsupportedOperatorError(LRPCError):
    """An aten op in the traced graph has no LRP rule.

    Carries the op, the graph node and the module path so that the message says exactly where it came
    from, and how to cover it.
    """

    def __init__(self, op: object, node: str, module: str, shape: object = None, *, complex_values: bool = False):
        self.op, self.node, self.module, self.shape = op, node, module, shape
        where = f"module '{module}'" if module else "the model's top-level forward"
        shape_text = f" (output shape {tuple(shape)})" if shape is not None else ""
        if complex_values:  # relevance is a real quantity: neither rules nor the gradient fallback apply
            how = (
                "It computes with complex values (an FFT, complex rotary embeddings), which LRP's rules and the "
                "gradient fallback do not cover: explain the model up to the complex part (output=), or keep "
                "that part's inputs constant."
            )
        else:
            how = (
                f"Register one with lrpc.register_rule({op}, rule) (e.g. lrpc.rules.Gradient() to route "
                "relevance through the op's gradient), or compile with on_unsupported='warn' to route it "
                "through the gradient with a warning."
            )
        super().__init__(f"no LRP rule for aten op {op} at graph node '{node}'{shape_text}, called from {where}.\n{how}")


class RuleError(LRPCError):
    """A rule or preset was configured wrongly, or does not fit the op it was assigned to."""
