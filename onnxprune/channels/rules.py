"""The channel-rule table, keyed by op type.

An op type that is not in this table is a barrier: channels reaching it are
kept. There is no fallback that guesses.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.channels.rule_base import ChannelRule
from onnxprune.channels.rules_attention import ATTENTION_RULES
from onnxprune.channels.rules_axes import AXES_RULES
from onnxprune.channels.rules_heads import HEAD_RULES
from onnxprune.channels.rules_layout import LAYOUT_RULES
from onnxprune.channels.rules_linear import LINEAR_RULES
from onnxprune.channels.rules_pointwise import POINTWISE_RULES
from onnxprune.channels.rules_products import PRODUCT_RULES
from onnxprune.channels.rules_quant import QUANT_RULES
from onnxprune.channels.rules_reshape import RESHAPE_RULES
from onnxprune.graphutil import is_default_domain


def _table(rules: list[ChannelRule]) -> dict[str, ChannelRule]:
    """The rules keyed by every op type they cover; two rules for one op type is an error."""
    table: dict[str, ChannelRule] = {}
    for rule in rules:
        for op in rule.ops:
            if op in table:
                raise ValueError(f"two channel rules for {op}")
            table[op] = rule
    return table


RULES: dict[str, ChannelRule] = _table(
    POINTWISE_RULES + LINEAR_RULES + LAYOUT_RULES + AXES_RULES + RESHAPE_RULES + HEAD_RULES + PRODUCT_RULES + QUANT_RULES
    + ATTENTION_RULES
)


def rule_for(node: gs.Node) -> ChannelRule | None:
    """The rule for ``node``: by op type, where the node's domain is one the rule is written for (a rule's
    ``domains`` attribute; the standard ONNX domain, "", where it has none)."""
    rule = RULES.get(node.op)
    if rule is None:
        return None
    domain = "" if is_default_domain(node) else node.domain
    return rule if domain in getattr(rule, "domains", ("",)) else None
