"""Graph passes: MoE structure by dataflow, and an Inductor pass that counts MoE nodes.

Importing this package changes no global state; the Inductor pass is installed only
inside ``with count_moe_nodes():``.
"""

from moe_ao.passes.capture import capture, experts_implementation
from moe_ao.passes.inductor_pass import MoECountingPass, count_moe_nodes, moe_node_counts
from moe_ao.passes.moe_structure import MoEStructure, analyze, find_moe_structure, find_moe_units

__all__ = [
    "MoECountingPass",
    "MoEStructure",
    "analyze",
    "capture",
    "count_moe_nodes",
    "experts_implementation",
    "find_moe_structure",
    "find_moe_units",
    "moe_node_counts",
]
