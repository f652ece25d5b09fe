"""The edgeslice wire protocol: pure values and functions, no I/O.

Everything an agent, the planner, a client or the monitor must agree on lives
here: the topic table (:mod:`.topics`), the message schemas (:mod:`.messages`),
the msgpack codec (:mod:`.codec`), chunked transfers (:mod:`.chunking`),
tensor packing (:mod:`.tensors`) and the exception tree (:mod:`.errors`).
"""

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 1  # 1: chunk headers carry "dc" (chunk capacity)
