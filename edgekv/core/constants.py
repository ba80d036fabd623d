"""Constants that several layers share: defined once here, at the bottom, so that none of them has to
import another layer (and its heavy dependencies) for a number or a name."""

# Additive mask value for KV slots a query must not see. Finite (float16's lowest) so a row whose
# slots are all masked (a padding row) gives a uniform softmax instead of NaN, and the same mask
# works if a device runs the graph in float16. exp(-65504) is exactly 0 in float32.
MASK_VALUE = -65504.0

# How pages are stored in the host and disk tiers (runtime/page_format.py).
KV_DTYPES = ("float32", "int8")

# Selection policies of the paged cache, and `dense`, the static full-context cache of the classic design.
POLICIES = ("quest", "rerank", "streaming", "dense")
DEFAULT_POLICY = "rerank"  # what generate, chat and Engine.open use when given none (README: why)

# Where the paged cache's keys sit for the step's queries (runtime/positions.py): each at its own position,
# or the far pages clamped to one position, folded into a few hundred, or grouped several to a position,
# inside the trained context.
POSITION_SCHEMES = ("absolute", "clamped", "folded", "grouped")

# The model `edgekv export` uses when given none.
DEFAULT_MODEL = "smollm2-135m-instruct"

# Where the graphs run (edgekv/targets): onnxruntime's CPU provider, or a vendor target's compiled graphs.
BACKENDS = ("cpu", "qnn-htp", "openvino", "rknn")
TARGETS = ("qnn-htp", "openvino", "rknn-rk3588")  # what `edgekv compile --target` compiles for
