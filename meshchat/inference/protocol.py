"""Between the inference layer's types and the typed wire bodies of distributed generation.

The head turns its planner's Plan and its SamplingParams into wire messages here; a stage
turns them back, and checks what only its own model can tell: the layer count, the trained
context, and whether the plan fits its memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshchat.engine.sampling import SamplingParams
from meshchat.inference.local_model import LocalModel
from meshchat.inference.planner import ModelNeeds, Plan
from meshchat.mesh import wire
from meshchat.mesh.identity import NodeId


class PlanRefused(Exception):
    """A stage will not run a plan; `code` goes back to the head in the Error reply."""

    def __init__(self, code: wire.FaultCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def plan_message(
    plan: Plan,
    model: LocalModel,
    *,
    n_ctx: int,
    max_sessions: int,
    dtype: wire.DType,
    flash_attn: bool,
) -> wire.Plan:
    """The PLAN request for `plan`."""
    stages = tuple(wire.PlanStage(s.node, s.first, s.end) for s in plan.stages)
    return wire.Plan(
        plan.plan_id, stages, model.fingerprint, n_ctx, max_sessions, dtype, flash_attn
    )


def sampling_to_wire(params: SamplingParams) -> wire.Sampling:
    return wire.Sampling(
        float(params.temperature), params.top_k, float(params.top_p), float(params.min_p),
        float(params.repeat_penalty), params.repeat_last_n, params.seed,
    )  # fmt: skip


def sampling_from_wire(body: wire.Sampling, n_ctx: int) -> SamplingParams:
    """The sampler settings a stage will build; `repeat_last_n` is kept within its context
    (llama.cpp allocates a ring of that many tokens)."""
    if body.repeat_last_n > n_ctx:
        raise ValueError(f"repeat_last_n {body.repeat_last_n} exceeds the context of {n_ctx}")
    return SamplingParams(
        body.temperature, body.top_k, body.top_p, body.min_p, body.repeat_penalty,
        body.repeat_last_n, body.seed,
    )  # fmt: skip


@dataclass(frozen=True)
class StageRole:
    """This node's part in a checked plan."""

    index: int
    first: int
    end: int
    prev: NodeId  # who sends us work: the head (for stage 0) or the previous stage
    next: NodeId | None  # None: the last stage, tokens go to the head
    memory: int  # bytes the range needs at the plan's context and sessions


def check_plan(msg: wire.Plan, me: NodeId, head: NodeId, model: LocalModel) -> StageRole | None:
    """Our role in `msg` after every check against our model, None if we have no part.

    PlanRefused if the plan does not fit the model (fingerprint, layers, context)."""
    index = msg.stage_of(me)
    if index is None:
        return None
    stage = msg.stages[index]
    if msg.stages[-1].end != model.n_layers:
        raise PlanRefused(
            wire.FaultCode.BAD_PLAN,
            f"the plan covers {msg.stages[-1].end} layers; the model has {model.n_layers}",
        )
    if not model.fingerprint.layers_match(msg.model, stage.first, stage.end):
        raise PlanRefused(
            wire.FaultCode.FINGERPRINT,
            f"node {me.short} has a different model file for layers [{stage.first},{stage.end}) "
            f"({model.path.name}, fingerprint {model.fingerprint.short})",
        )
    if msg.n_ctx > model.spec.context_length:
        raise PlanRefused(
            wire.FaultCode.BAD_PLAN,
            f"n_ctx {msg.n_ctx} exceeds the model's trained context {model.spec.context_length}",
        )
    last = index == len(msg.stages) - 1
    memory = ModelNeeds.of(model).memory(stage.first, stage.end, last, msg.n_ctx, msg.max_sessions)
    prev = head if index == 0 else msg.stages[index - 1].node
    nxt = None if last else msg.stages[index + 1].node
    return StageRole(index, stage.first, stage.end, prev, nxt, memory)
