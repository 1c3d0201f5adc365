"""ScheduleFusedKernels, Before/Expected in TVMScript (TVM's test_transform_* style).

A deferred kernel (an ``out`` block carrying a schedule spec) followed by the elementwise
epilogue FuseTIR put into the same PrimFunc: the pass inlines the epilogue into ``out`` and
applies the spec's schedule (here a kind registered by the test, through the registry a target
module uses), then marks the function scheduled.
"""

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import tirx as T

from relay_passes import ScheduleFusedKernels
from schedules import host


def _parallel_vector(sch, spec):
    i, j = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(i)
    sch.vectorize(j)
    return sch


@pytest.fixture(autouse=True)
def test_kind():
    host.register_deferred_kind("test_parallel", _parallel_vector)
    yield
    host._DEFERRED_KINDS.pop("test_parallel")


@I.ir_module(s_tir=True)
class Before:
    @T.prim_func(s_tir=True)
    def fused_kernel(A: T.Buffer((4, 8), "int32"), T_add: T.Buffer((4, 8), "float32")):
        T.func_attr({"tirx.noalias": True})
        out = T.sblock_alloc_buffer((4, 8), "int32")
        for i, j in T.grid(4, 8):
            with T.sblock("out"):
                v_i, v_j = T.axis.remap("SS", [i, j])
                T.reads(A[v_i, v_j])
                T.writes(out[v_i, v_j])
                T.sblock_attr({"sparks_tvm.deferred_schedule": "{\"kind\": \"test_parallel\"}"})
                out[v_i, v_j] = A[v_i, v_j] * 2
        for i, j in T.grid(4, 8):
            with T.sblock("T_add"):
                v_i, v_j = T.axis.remap("SS", [i, j])
                T.reads(out[v_i, v_j])
                T.writes(T_add[v_i, v_j])
                T_add[v_i, v_j] = T.Cast("float32", out[v_i, v_j]) + T.float32(1.0)


@I.ir_module(s_tir=True)
class Expected:
    @T.prim_func(s_tir=True)
    def fused_kernel(A: T.Buffer((4, 8), "int32"), T_add: T.Buffer((4, 8), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for i in T.parallel(4):
            for j in T.vectorized(8):
                with T.sblock("out"):
                    v_i, v_j = T.axis.remap("SS", [i, j])
                    T.reads(A[v_i, v_j])
                    T.writes(T_add[v_i, v_j])
                    T.sblock_attr({"sparks_tvm.deferred_schedule": "{\"kind\": \"test_parallel\"}"})
                    T_add[v_i, v_j] = T.Cast("float32", A[v_i, v_j] * 2) + T.float32(1.0)


@I.ir_module(s_tir=True)
class TwoConsumers:
    @T.prim_func(s_tir=True)
    def fused_kernel(A: T.Buffer((4, 8), "int32"), B: T.Buffer((4, 8), "float32"), C: T.Buffer((4, 8), "int32")):
        T.func_attr({"tirx.noalias": True})
        out = T.sblock_alloc_buffer((4, 8), "int32")
        for i, j in T.grid(4, 8):
            with T.sblock("out"):
                v_i, v_j = T.axis.remap("SS", [i, j])
                T.reads(A[v_i, v_j])
                T.writes(out[v_i, v_j])
                T.sblock_attr({"sparks_tvm.deferred_schedule": "{\"kind\": \"test_parallel\"}"})
                out[v_i, v_j] = A[v_i, v_j] * 2
        for i, j in T.grid(4, 8):
            with T.sblock("B"):
                v_i, v_j = T.axis.remap("SS", [i, j])
                T.reads(out[v_i, v_j])
                T.writes(B[v_i, v_j])
                B[v_i, v_j] = T.Cast("float32", out[v_i, v_j])
        for i, j in T.grid(4, 8):
            with T.sblock("C"):
                v_i, v_j = T.axis.remap("SS", [i, j])
                T.reads(out[v_i, v_j])
                T.writes(C[v_i, v_j])
                C[v_i, v_j] = out[v_i, v_j] + 1


def test_epilogue_inlined_then_scheduled():
    sched = ScheduleFusedKernels()
    after = sched(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    assert sched.inlined == {"fused_kernel": 1}


def test_scheduled_functions_are_left_alone():
    tvm.ir.assert_structural_equal(ScheduleFusedKernels()(Expected), Expected)


def test_two_consumers_stop_the_chain():
    # The conv result feeds two ops: it stays in memory, and the kernel is still scheduled.
    sched = ScheduleFusedKernels()
    after = sched(TwoConsumers)
    assert sched.inlined == {"fused_kernel": 0}
    func = after["fused_kernel"]
    assert func.attrs["tirx.is_scheduled"]
    assert "T.parallel(4)" in func.script() and 'T.sblock("C")' in func.script()
