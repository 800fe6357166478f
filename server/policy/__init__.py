"""Middleware policy: per request, decide resolution, pruning and prompt length.

Policies only decide; ``models.reduce`` carries the decisions out. Each decision
object has an ``attributes()`` (or plain fields) for the request's telemetry record.
"""

from server.policy.budget import BudgetPlan, CostEstimate, CostModel, ImagePlan, ImageSpec, plan_for_budget
from server.policy.extension import EdgeVLMExtension, PruneRequest, parse_extension
from server.policy.profiles import DEFAULT_PROFILES, Profile, ProfileSet
from server.policy.pruning import PruneDecision, decide_prune
from server.policy.resolution import BudgetDecision, ImageStats, decide_budget, image_stats
from server.policy.truncation import PromptTooLongError, truncate_messages

__all__ = [
    "DEFAULT_PROFILES",
    "BudgetDecision",
    "BudgetPlan",
    "CostEstimate",
    "CostModel",
    "EdgeVLMExtension",
    "ImagePlan",
    "ImageSpec",
    "ImageStats",
    "Profile",
    "ProfileSet",
    "PromptTooLongError",
    "PruneDecision",
    "PruneRequest",
    "decide_budget",
    "decide_prune",
    "image_stats",
    "parse_extension",
    "plan_for_budget",
    "truncate_messages",
]
