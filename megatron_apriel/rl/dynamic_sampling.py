"""Online filtering of GRPO groups (DAPO's dynamic sampling) on top of TRL's GRPOTrainer.

A group whose rollouts all get the same reward (all solved, all failed) has zero advantage: it
costs a generation and a backward pass and teaches nothing. The offline pass-rate filter
(``filter.enabled``) removes such prompts once, judged by the starting policy; as the policy
improves, other prompts become all-solved. Here every generation batch is checked as it is made:
degenerate groups are dropped and replaced by groups of fresh prompts, generated and scored the same
way, until the batch is full again or ``max_rounds`` refills have run (then the rest is filled with
dropped groups, whose zero advantage only dilutes the step, and counted).

TRL 1.x has no such option, so this subclass wraps ``_generate_and_score_completions``; the refill
prompts come from a seeded permutation of the training set that every rank draws identically (the
keep/drop decision uses the rewards TRL has already gathered across ranks, so all ranks agree on how
many refill rounds run: each round is a collective generation). Counts are logged as
``dynamic_sampling/*`` metrics and summed in ``totals`` (groups generated and dropped count every
round, refills included).
"""

from __future__ import annotations

import random

import torch
from trl import GRPOTrainer

# Output keys padded on the left (prompts are left-padded by TRL); every other 2-D tensor is per
# completion token and padded on the right.
_LEFT_PADDED = ("prompt_ids", "prompt_mask")


class DynamicSamplingGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, max_rounds: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        local_rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
        if local_rows % self.num_generations:  # GRPORunConfig.validate says so first, for apriel grpo
            raise ValueError(f"dynamic sampling needs whole groups per rank: per_device_train_batch_size x "
                             f"steps_per_generation ({local_rows}) must be a multiple of num_generations "
                             f"({self.num_generations})")
        self.max_rounds = max_rounds
        self._rng = random.Random(self.args.seed)
        self._order: list[int] = []
        self.totals = {"groups": 0, "dropped": 0, "refill_rounds": 0, "filled_with_dropped": 0,
                       "trained_zero_advantage": 0}

    def _calculate_rewards(self, *args, **kwargs):
        rewards = super()._calculate_rewards(*args, **kwargs)  # gathered over ranks: (rows, reward funcs)
        self._last_rewards = rewards
        return rewards

    def _informative_groups(self, n_local_groups: int) -> torch.Tensor:
        """(ranks, groups per rank) bool: the group's rewards are not all equal."""
        weights = self.reward_weights.to(self._last_rewards.device)
        r = (self._last_rewards * weights).nansum(dim=1).view(-1, self.num_generations)
        spread = r.max(dim=1).values - r.min(dim=1).values
        return (~torch.isclose(spread, torch.zeros_like(spread))).view(self.accelerator.num_processes, n_local_groups)

    def _fresh_inputs(self, n_local_groups: int) -> list[dict]:
        """This rank's share of the next ``ranks x n_local_groups`` prompts of the refill stream."""
        ranks = self.accelerator.num_processes
        need = ranks * n_local_groups
        while len(self._order) < need:
            order = list(range(len(self.train_dataset)))
            self._rng.shuffle(order)
            self._order += order
        picked, self._order = self._order[:need], self._order[need:]
        mine = picked[self.accelerator.process_index * n_local_groups:][:n_local_groups]
        return [dict(self.train_dataset[i]) for i in mine for _ in range(self.num_generations)]

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            return super()._generate_and_score_completions(inputs)
        G, rank = self.num_generations, self.accelerator.process_index
        n_groups = len(inputs) // G
        first = super()._generate_and_score_completions(inputs)
        informative = self._informative_groups(n_groups)
        parts = [(first, [j for j in range(n_groups) if informative[rank, j]])]
        have = informative.sum(dim=1)
        generated, dropped, rounds = informative.numel(), int(informative.numel() - have.sum()), 0
        while int(have.min()) < n_groups and rounds < self.max_rounds:
            rounds += 1
            out = super()._generate_and_score_completions(self._fresh_inputs(n_groups))
            informative = self._informative_groups(n_groups)
            generated, dropped = generated + informative.numel(), dropped + int((~informative).sum())
            need = n_groups - int(have[rank])
            parts.append((out, [j for j in range(n_groups) if informative[rank, j]][:need]))
            have = torch.minimum(have + informative.sum(dim=1), torch.full_like(have, n_groups))
        short = n_groups - sum(len(groups) for _, groups in parts)
        if short:
            parts.append((first, [j for j in range(n_groups) if j not in parts[0][1]][:short]))
        merged = self._merge(parts)
        zero = merged["advantages"].view(-1, G).abs().amax(dim=1) == 0
        counts = torch.tensor([short, int(zero.sum())], device=merged["advantages"].device)
        filled, zero_adv = self.accelerator.gather(counts).view(-1, 2).sum(dim=0).tolist()
        for key, value in (("groups", generated), ("dropped", dropped), ("refill_rounds", rounds),
                           ("filled_with_dropped", filled), ("trained_zero_advantage", zero_adv)):
            self.totals[key] += value
            if key != "groups":
                self._metrics["train"][f"dynamic_sampling/{key}"].append(float(value))
        return merged

    def _merge(self, parts: list[tuple[dict, list[int]]]) -> dict:
        """Rows of the chosen groups of each generation output, padded to common widths."""
        G = self.num_generations
        pad_id = self.processing_class.pad_token_id if self.processing_class.pad_token_id is not None else 0
        merged = {}
        for key, value in parts[0][0].items():
            if key == "num_items_in_batch":
                continue
            if not torch.is_tensor(value) or value.dim() not in (1, 2):
                raise ValueError(f"dynamic sampling cannot merge generation output {key!r} (multimodal or tool "
                                 f"outputs are not supported)")
            pieces = []
            for out, groups in parts:
                rows = torch.tensor([g * G + i for g in groups for i in range(G)], dtype=torch.long,
                                    device=value.device)
                pieces.append(out[key].index_select(0, rows))
            if value.dim() == 2:
                width = max(p.shape[1] for p in pieces)
                fill = pad_id if key in ("prompt_ids", "completion_ids") else 0
                left = key in _LEFT_PADDED
                pieces = [torch.nn.functional.pad(p, (width - p.shape[1], 0) if left else (0, width - p.shape[1]),
                                                  value=fill) for p in pieces]
            merged[key] = torch.cat(pieces)
        mask = merged["completion_mask"] * merged["tool_mask"] if "tool_mask" in merged else merged["completion_mask"]
        merged["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
        return merged
