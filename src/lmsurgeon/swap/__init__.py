"""Layer swap analysis (methods.md §S1–§S13): which adjacent layers can be exchanged or dropped, and why.

``analyze(source, config=SwapConfig(...), out=...)`` runs the whole analysis and returns exactly the
results.json dict (schema ``lmsurgeon/swap@1``); the pieces are importable for reuse and tests: capture/replay
of layer inputs (``capture``), the paper's equations (``metrics``), the streaming least-squares fit
(``linear``), end-to-end losses (``e2e``), bootstrap Spearman (``stats``) and checkpoint rewiring (``apply``).
"""

from lmsurgeon.swap.capture import Capture, capture, continue_from, delta_from_cache, swapped_output
from lmsurgeon.swap.config import SwapConfig
from lmsurgeon.swap.run import analyze

__all__ = ["Capture", "SwapConfig", "analyze", "capture", "continue_from", "delta_from_cache", "swapped_output"]
