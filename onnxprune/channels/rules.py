"""The channel-rule table, keyed by op type.

An op type that is not in this table is a barrier: channels reaching it are
kept. There is no fallback that guesses.
"""

from __future__ import annotations

from onnxprune.channels.rule_base import ChannelRule
from onnxprune.channels.rules_layout import LAYOUT_RULES
from onnxprune.channels.rules_linear import LINEAR_RULES
from onnxprune.channels.rules_pointwise import POINTWISE_RULES


def _table(rules: list[ChannelRule]) -> dict[str, ChannelRule]:
    table: dict[str, ChannelRule] = {}
    for rule in rules:
        for op in rule.ops:
            if op in table:
                raise ValueError(f"two channel rules for {op}")
            table[op] = rule
    return table


RULES: dict[str, ChannelRule] = _table(POINTWISE_RULES + LINEAR_RULES + LAYOUT_RULES)


def rule_for(op_type: str) -> ChannelRule | None:
    return RULES.get(op_type)
