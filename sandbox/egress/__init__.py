"""What may leave: pure checks from facts about an output file to verdicts a steward can read.

`baseline` tells a file's kind; the disclosure checks (tables, leak scanning) read its content.
`sandbox.release` routes the results to release, review or block.
"""

from sandbox.egress.baseline import detect_kind, sniff
from sandbox.egress.verdicts import CheckResult, OutputFacts, OutputKind, Verdict

__all__ = [
    "CheckResult",
    "OutputFacts",
    "OutputKind",
    "Verdict",
    "detect_kind",
    "sniff",
]
