"""Cross-architecture embedding merge: token correspondence, Procrustes alignment, guarded blend, Optuna search."""

from lmsurgeon.merge.config import MergeConfig
from lmsurgeon.merge.generate import compare_generation
from lmsurgeon.merge.run import MergeSession, run_domain_merge, run_merge

__all__ = ["MergeConfig", "MergeSession", "compare_generation", "run_domain_merge", "run_merge"]
