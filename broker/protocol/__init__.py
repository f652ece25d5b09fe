"""The edgeslice wire protocol: pure values and functions, no I/O.

Everything an agent, the planner, a client or the monitor must agree on lives
here: the topic table (:mod:`.topics`), the message schemas (:mod:`.messages`),
the msgpack codec (:mod:`.codec`), chunked transfers (:mod:`.chunking`),
tensor packing (:mod:`.tensors`) and the exception tree (:mod:`.errors`).
"""

PROTOCOL_MAJOR = 1
# Minor versions (each readable by the previous one, each reading the previous one):
#   1: chunk headers carry "dc" (chunk capacity)
#   2: the chunk header's "m" is a typed message: a RequestEnvelope for request, activation
#      and result transfers, an ErrorReply (plus "code") for error transfers; both add "k"
#      and "v" and keep 1.1's keys, so 1.1 peers read them and 1.2 reads 1.1's maps
#   3: per-chunk checksums: every chunk carries "x" = crc32 of its own data, checked on
#      arrival; the header's whole-payload "c" is gone (the sender no longer reads the whole
#      payload before chunk 0 leaves). 1.3 receivers still read 1.2 transfers ("c", no "x");
#      a 1.2 receiver refuses a 1.3 header as malformed (no "c"): upgrade receivers first
#   4: tiled (intra-layer) plans: PlanStage.tiles/tiling, StageAssignment.in_box/out_box,
#      RequestEnvelope.tiles/box/attempt (all optional; a tiled request has an empty route,
#      so a 1.3 agent refuses it with an error instead of computing a piece as a whole)
PROTOCOL_MINOR = 4
