"""Drop-in glue for RLHF trainers, client side (grpc + protobuf + stdlib; never torch): one module per trainer.

- trl:      sync and async reward functions for GRPOTrainer / RLOOTrainer
- verl:     `compute_score(data_source, solution_str, ground_truth, extra_info)` and its batched form
- openrlhf: the remote reward-model HTTP protocol (`POST /get_reward`), served by `rewardsvc serve --http-port`
- chat_text: templated chat text -> messages (OpenRLHF sends prompts already rendered in the policy's template)

Examples with real output: docs/INTEGRATIONS.md.
"""
