"""What may leave: pure checks from facts about an output file to verdicts a steward can read.

`baseline` routes each file by kind, content, size and policy; the disclosure checks (tables,
leak scanning) plug into it as content checks.
"""

from sandbox.egress.baseline import OutputDecision, decide_outputs, detect_kind, sniff
from sandbox.egress.verdicts import CheckResult, OutputFacts, OutputKind, Verdict

__all__ = [
    "CheckResult",
    "OutputDecision",
    "OutputFacts",
    "OutputKind",
    "Verdict",
    "decide_outputs",
    "detect_kind",
    "sniff",
]
