"""Drop-in glue for RLHF trainers, client side (grpc + protobuf + stdlib; never torch): one module per trainer.

- trl:      sync and async reward functions for GRPOTrainer / RLOOTrainer
- verl:     what verl 0.9.1's Reward Loop loads (by pkg:// or file path): `compute_score`, `compute_score_async`
            (verl_score) and `RewardsvcRewardManager`, a reward-loop manager that coalesces a chunk into one RPC
            (verl_reward_loop, the one module that imports its trainer)
- partial_batches: score a batch in which some samples are rejected, without failing the others
- openrlhf: the remote reward-model HTTP protocol (`POST /get_reward`), served by `rewardsvc serve --http-port`
- chat_text: templated chat text -> messages (OpenRLHF sends prompts already rendered in the policy's template)

Examples with real output: docs/INTEGRATIONS.md.
"""
