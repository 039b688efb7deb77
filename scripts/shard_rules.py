"""Print the ATen ops the sharding pass (autocp.passes.shard) has explicit rules for, how
many ATen overloads are covered by the pointwise tag, and what happens to anything else.

    python scripts/shard_rules.py
"""

import torch

from autocp.passes.shard import RULES, register_opaque_rule

register_opaque_rule()
explicit = sorted(str(k) for k in RULES)
pointwise = 0
for name in dir(torch.ops.aten):
    pkt = getattr(torch.ops.aten, name, None)
    if not isinstance(pkt, torch._ops.OpOverloadPacket):
        continue
    for ov in pkt.overloads():
        op = getattr(pkt, ov)
        if torch.Tag.pointwise in op.tags and op not in RULES:
            pointwise += 1
print(f"{len(explicit)} ops with an explicit rule:")
for k in explicit:
    print("  ", k)
print(f"{pointwise} further ATen overloads covered by the pointwise rule (torch.Tag.pointwise)")
print("every other op: run on gathered inputs (exact, replicated result), noted, warned when it "
      "gathers a pair tensor, refused under strict=True; in-place writes into sharded or "
      "redistributed values without a rule are refused")
