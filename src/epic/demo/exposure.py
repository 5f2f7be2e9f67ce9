"""Budget exposure: how much of a run trained at the scored budget and layer, replayed from its own options.

The schedules are pure functions of (seed, step, stream) and the learning rate a pure function of the step, so the
whole run can be replayed without training: `epic train`'s option parser and curriculum builder read the run's own
argument list, and transformers' `get_scheduler` gives the rate of each step as the Trainer sets it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import TrainingArguments, get_scheduler

from epic.distill import plan_step
from epic.train.config import parse_recipe
from epic.train.run import build_curriculum


@dataclass(frozen=True)
class Exposure:
    """Steps (and their share of the summed learning rate) whose student trained at or beyond the scored budget
    at or before the scored layer, and the student's mean kept tokens per image over the run."""

    steps: int
    steps_at_budget: int
    lr_share_at_budget: float
    mean_kept_tokens: float
    first_step_at_budget: int | None
    kept_tokens: tuple[int, ...]  # the student's kept visual tokens per image, per step


def learning_rates(training: TrainingArguments) -> list[float]:
    """The learning rate of every optimizer step of a run with these training arguments."""
    steps = training.max_steps
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training.learning_rate)
    scheduler = get_scheduler(
        training.lr_scheduler_type,
        optimizer,
        num_warmup_steps=training.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=training.lr_scheduler_kwargs or {},
    )
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def budget_exposure(arguments: list[str], num_layers: int, image_tokens: int, budget: int) -> Exposure:
    """Replay a one-process run (one micro-batch per step, stream 0) of `epic train` with `arguments`: which steps
    kept at most `budget` visual tokens per image from the curriculum's final layer on."""
    _, _, distill, training = parse_recipe(None, arguments)
    curriculum = build_curriculum(distill, num_layers, image_tokens)
    rates = learning_rates(training)
    steps = len(rates)
    kept, at_budget = [], []
    for step in range(steps):
        plan, _ = plan_step(curriculum, distill.compression_seed, step, steps)
        tokens = round(image_tokens * (1.0 - plan.student_ratio)) if plan.student_compresses else image_tokens
        kept.append(tokens)
        at_budget.append(plan.student_compresses and tokens <= budget and plan.student_layer <= curriculum.layer)
    total = sum(rates) or 1.0
    first = next((step for step, hit in enumerate(at_budget) if hit), None)
    return Exposure(
        steps=steps,
        steps_at_budget=sum(at_budget),
        lr_share_at_budget=sum(rate for rate, hit in zip(rates, at_budget, strict=True) if hit) / total,
        mean_kept_tokens=sum(kept) / max(steps, 1),
        first_step_at_budget=first,
        kept_tokens=tuple(kept),
    )
