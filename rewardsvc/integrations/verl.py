"""What verl 0.9.1 loads: name this module in its config, by package or by file path.

    reward.custom_reward_function.path=pkg://rewardsvc.integrations.verl     # or /path/to/rewardsvc/integrations/verl.py
    reward.custom_reward_function.name=compute_score                       # or compute_score_async
    +reward.custom_reward_function.reward_kwargs.target=HOST:PORT

    reward.reward_manager.source=importlib                                 # the coalescing manager instead
    reward.reward_manager.module.path=pkg://rewardsvc.integrations.verl
    reward.reward_manager.name=RewardsvcRewardManager

verl loads a file path with importlib.util.spec_from_file_location (verl/utils/import_utils.py), outside any
package, so this module uses absolute imports only, and only re-exports: the functions live in importable
modules (verl_score, verl_reward_loop), which Ray actors unpickle by reference. RewardsvcRewardManager imports
verl, so it is resolved on first access (module __getattr__; verl's loader asks with hasattr/getattr).
Examples and the verl version tested: docs/INTEGRATIONS.md.
"""

from __future__ import annotations

from typing import Any

from rewardsvc.integrations.verl_score import compute_score, compute_score_async

__all__ = ["RewardsvcRewardManager", "compute_score", "compute_score_async"]


def __getattr__(name: str) -> Any:
    if name == "RewardsvcRewardManager":
        from rewardsvc.integrations.verl_reward_loop import RewardsvcRewardManager

        return RewardsvcRewardManager
    raise AttributeError(f"module 'rewardsvc.integrations.verl' has no attribute {name!r}")
