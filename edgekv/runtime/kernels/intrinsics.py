"""LLVM operations numba does not offer, for the kernels: a bit cast and a cache prefetch."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def float32_from_bits(typingctx, bits):
    """A uint32's bits as a float32, in compiled code (numba has no scalar view)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(inline="always")
def bfloat16_value(bits: np.uint16) -> np.float32:
    """The float32 value of bfloat16 bits, in compiled code: a shift, which vectorizes in loops."""
    return float32_from_bits(np.uint32(bits) << np.uint32(16))


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to bring element `index` of a C-contiguous array into its caches (LLVM's prefetch for a
    read, kept in every cache level), in compiled code."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte = ir.IntType(8).as_pointer()
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [byte] + [ir.IntType(32)] * 3))
        read, keep, data_cache = (ir.Constant(ir.IntType(32), v) for v in (0, 3, 1))
        builder.call(function, [builder.bitcast(builder.gep(data, [args[1]]), byte), read, keep, data_cache])
        return context.get_dummy_value()
    return types.void(array, index), codegen
