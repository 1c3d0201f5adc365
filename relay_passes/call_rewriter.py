"""Shared machinery of the passes that lower one Relax op to a ``call_tir`` of our kernel.

Not a pass itself: :func:`rewrite_calls` walks every Relax function of a module and hands each
call, post-order, to ``rewrite(rewriter, call)``, which returns the replacement or ``None``
(keep the call). ``rewriter.builder_`` adds kernels, ``rewriter.lookup_binding`` resolves
variables, and ``rewriter.count`` numbers the rewrites (kernel symbols).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


@mutator
class CallRewriter(PyExprMutator):  # pylint: disable=abstract-method
    """Post-order call rewriter around one ``rewrite`` function."""

    def __init__(self, mod, rewrite):
        super().__init__(mod)
        self.rewrite = rewrite
        self.count = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # pylint: disable=arguments-renamed
        call = self.visit_expr_post_order(call)
        new = self.rewrite(self, call)
        if new is None:
            return call
        self.count += 1
        return new


def rewrite_calls(mod: tvm.IRModule, rewrite) -> tuple:
    """``(module, number of calls rewritten)`` after ``rewrite`` on every Relax function."""
    rewriter = CallRewriter(mod, rewrite)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get(), rewriter.count
