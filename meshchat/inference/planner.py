"""The split planner: which node runs which contiguous layer range.

Decode on a chain is sequential: one token visits every stage in turn, so its time is the sum of
every stage's compute plus one network hop per change of node (and back to the head). The
planner minimises that predicted time per token subject to each node's memory, the model's
allowed split points and fingerprints (a node runs only layers its own file holds identically).
Splitting never makes one sequence decode faster; it lets a model run that does not fit on one
node, or moves layers to faster nodes. `PlanChoice.advice` says which, in words.

Hand plans (`--split`, the split editor) are checked with `violations`, one message per problem.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshchat.errors import MeshchatError
from meshchat.inference.capabilities import NodeCaps
from meshchat.inference.local_model import LocalModel
from meshchat.inference.profiling import extra_context
from meshchat.mesh.identity import NodeId
from meshchat.model.architectures import allowed_split_points
from meshchat.model.fingerprint import Fingerprint

# Costs measured on the development machine (loopback, aioquic, asyncio): the Python work of
# one activation message end to end, and what a stage pays per llama_decode call beyond its
# layers (graph build, thread wake-up).
HOP_OVERHEAD_S = 0.00035
STAGE_OVERHEAD_S = 0.0002
DEFAULT_RTT_MS = 1.0  # two nodes with no measurement between them yet
LINK_BYTES_PER_S = 100e6  # a gigabit LAN, less framing
_MIB = 1 << 20
MAX_STAGES = 8  # the most stages a plan has (more hops cost more than they save)
# Rows a stage takes in one llama_decode call: the head's prompt chunk (MeshPipeline), since
# more rows only reserve memory (a stage that is not last holds two n_batch x n_vocab float
# buffers: 2 x 96 MiB for SmolLM2 at 512 rows).
STAGE_BATCH = 256
_COMPUTE_SLACK = 4 * _MIB  # graph bookkeeping beyond the widest tensors (measured 1-3.4 MiB)
# Stages whose nodes share one host and, together, run more threads than it has cores pay
# for it even though a chain computes one stage at a time: idle llama.cpp threads still spin
# and three processes' event loops wake on the same cores. Each stage on such a host costs
# 1 + SHARE_COST x (threads - cores) / cores times its calibrated compute. Fitted on the 1B
# bench (2 vCPUs, 2 threads a node): mesh3's stage compute was 35.5 ms against 29.1 predicted
# without it, 34.9 with it (test_observed_speed.py::test_the_mesh3_bench_row_is_charged_...).
SHARE_COST = 0.1
MAX_SHARE_CHARGE = 4.0  # whatever nodes claim about their host, no stage costs more than this


def label(node: NodeId) -> str:
    """How plans and their messages name a node: its NodeID's first 8 characters."""
    return str(node)[:8]


class PlanError(MeshchatError):
    """No plan fits, or a hand plan breaks a rule (the message lists every problem)."""


@dataclass(frozen=True)
class StagePlan:
    node: NodeId
    first: int
    end: int

    def __str__(self) -> str:
        return f"[{self.first},{self.end})"


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]
    plan_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16], compare=False)

    @property
    def nodes(self) -> list[NodeId]:
        return [s.node for s in self.stages]

    @property
    def boundaries(self) -> list[int]:
        return [s.first for s in self.stages[1:]]

    def stage_of(self, node: NodeId) -> StagePlan | None:
        return next((s for s in self.stages if s.node == node), None)

    def describe(self, head: NodeId | None = None) -> str:
        """'[0,15) on 3f2a9c1b (head) → [15,30) on 9be01d77'."""
        return " → ".join(
            f"{s} on {label(s.node)}{' (head)' if s.node == head else ''}" for s in self.stages
        )


@dataclass(frozen=True)
class ModelNeeds:
    """What running layers of the model costs, from its spec (the head's copy)."""

    n_layers: int
    layer_bytes: tuple[int, ...]
    output_bytes: int
    kv_bytes_per_token_layer: int
    hidden_bytes: int  # one token's activations on the wire (float32)
    allowed: frozenset[int]
    fingerprint: Fingerprint
    n_vocab: int = 0
    global_bytes: int = 0  # embeddings, output matrix, norms: every slice file keeps them
    n_head: int = 0

    @classmethod
    def of(cls, model: LocalModel) -> ModelNeeds:
        return cls(
            n_layers=model.n_layers,
            layer_bytes=model.spec.layer_bytes,
            output_bytes=model.output_bytes,
            kv_bytes_per_token_layer=model.kv_bytes_per_token_layer,
            hidden_bytes=model.spec.n_embd * 4,
            allowed=frozenset(allowed_split_points(model.spec)),
            fingerprint=model.fingerprint,
            n_vocab=model.spec.vocab_size,
            global_bytes=model.spec.global_bytes,
            n_head=model.spec.n_head,
        )

    def weights(self, first: int, end: int, last: bool) -> int:
        """Bytes of weights a decode step of these layers reads (what its time scales with)."""
        return sum(self.layer_bytes[first:end]) + (self.output_bytes if last else 0)

    def memory(
        self, first: int, end: int, last: bool, n_ctx: int, sessions: int, n_batch: int = 0
    ) -> int:
        """Bytes a stage of these layers allocates, an upper bound of what llama.cpp reports
        (meshchat.engine.stage_memory; tests/test_memory_budget.py checks it on real loads).

        - weights: its layers and every global tensor (a slice file keeps them all);
        - KV cache: f16 keys and values, n_ctx cells per session;
        - compute buffer: llama.cpp reserves the whole graph for n_batch rows, lm head
          included even where the stage stops before it (n_batch x n_vocab floats) or the
          attention scores if wider (n_ctx x n_head), plus 16 activations a row (measured up
          to 12) and some slack: 49.1 MiB measured for SmolLM2 at 256 rows, 61 predicted;
        - output buffer: a stage that passes hidden states on flags every row as output, so it
          holds n_batch rows of logits; the last stage holds one row per session.
        """
        rows = n_batch or STAGE_BATCH
        kv = self.kv_bytes_per_token_layer * (end - first) * n_ctx * sessions
        widest = max(self.n_vocab, n_ctx * self.n_head) + 16 * (self.hidden_bytes // 4)
        compute = rows * 4 * widest + _COMPUTE_SLACK
        output = self.n_vocab * 4 * (sessions if last else rows)
        return sum(self.layer_bytes[first:end]) + self.global_bytes + kv + compute + output

    def smallest_stage(self, n_ctx: int, sessions: int = 1) -> int:
        """Bytes of the cheapest stage any plan can have (one span between split points)."""
        points = [0, *sorted(p for p in self.allowed if 0 < p < self.n_layers), self.n_layers]
        return min(
            self.memory(a, b, b == self.n_layers, n_ctx, sessions)
            for a, b in itertools.pairwise(points)
        )


@dataclass(frozen=True)
class StageCost:
    """The planner's decode cost of one stage of a plan, before any observed correction."""

    node: NodeId
    weight_bytes: int  # its layers' weights (and the output matrix if last)
    kv_bytes_per_token: int  # KV cache its layers read per token of context
    s_per_byte: float  # the node's calibrated decode speed
    charge: float  # for sharing its host's cores (Planner.share_charges)
    context_s_per_byte: float = 0.0  # the node's measured context term (0: not measured)

    def seconds(self, extra_context: int) -> float:
        """Predicted compute at `extra_context` tokens beyond the calibration's own: the
        node's measured context term if it has one, else its KV cache's bytes read at its
        decode speed (the probe: SmolLM2 decodes 16-17% slower at 512 than near 152, its KV
        bytes say 11%; the 1B synthetic model 5% slower, its KV bytes say 1%)."""
        context = max(0, extra_context)
        if self.context_s_per_byte > 0:
            per_byte = self.s_per_byte + self.context_s_per_byte * context
            compute = self.weight_bytes * per_byte
        else:
            compute = (self.weight_bytes + self.kv_bytes_per_token * context) * self.s_per_byte
        return compute * self.charge + STAGE_OVERHEAD_S


@dataclass(frozen=True)
class Prediction:
    decode_s: float  # per token, compute + network
    compute_s: float
    network_s: float
    prefill_tok_s: float

    @property
    def decode_tok_s(self) -> float:
        return 1.0 / self.decode_s if self.decode_s > 0 else float("inf")


@dataclass(frozen=True)
class PlanChoice:
    plan: Plan
    prediction: Prediction
    advice: str  # why this many nodes, in one sentence
    single: Prediction | None = None  # the best one-node plan, if any node fits the model


class Planner:
    def __init__(
        self,
        needs: ModelNeeds,
        nodes: Iterable[NodeCaps],
        head: NodeId,
        n_ctx: int,
        sessions: int = 1,
    ) -> None:
        self.needs = needs
        self.head = head
        self.n_ctx = n_ctx
        self.sessions = sessions
        # Decode reads the KV cache as well as the weights: at a typical position (half the
        # context) beyond the one the calibration decoded at, which its speed already holds
        # (StageCost.seconds).
        self.extra_context = extra_context(n_ctx // 2)
        self.nodes: dict[NodeId, NodeCaps] = {}
        for caps in nodes:
            self.nodes.setdefault(caps.node_id, caps)
        self._match: dict[NodeId, list[int]] = {
            n: self._match_prefix(c) for n, c in self.nodes.items()
        }

    # -- eligibility ---------------------------------------------------------------------------

    def _match_prefix(self, caps: NodeCaps) -> list[int]:
        """Prefix counts of layers whose weights this node holds identically to the head."""
        ours, theirs = self.needs.fingerprint, caps.fingerprint
        n = self.needs.n_layers
        if (
            theirs is None
            or theirs.config != ours.config
            or theirs.globals != ours.globals
            or len(theirs.layers) != n
            or caps.decode_s_per_byte <= 0
        ):
            return [0] * (n + 1)
        prefix = [0]
        for a, b in zip(ours.layers, theirs.layers, strict=True):
            prefix.append(prefix[-1] + (a == b))
        return prefix

    def matches(self, node: NodeId, first: int, end: int) -> bool:
        prefix = self._match.get(node)
        return prefix is not None and prefix[end] - prefix[first] == end - first

    def mismatched(self) -> list[NodeId]:
        """Nodes whose model differs from the head's in every layer (they get no layers)."""
        return [n for n, p in self._match.items() if p[-1] == 0]

    def fits(self, node: NodeId, first: int, end: int) -> bool:
        last = end == self.needs.n_layers
        need = self.needs.memory(first, end, last, self.n_ctx, self.sessions)
        return need <= self.nodes[node].free_memory

    # -- prediction ----------------------------------------------------------------------------

    def hop_s(self, a: NodeId, b: NodeId) -> float:
        if a == b:
            return 0.0
        rtt = self.nodes[a].rtt_ms.get(b) if a in self.nodes else None
        if rtt is None and b in self.nodes:
            rtt = self.nodes[b].rtt_ms.get(a)
        rtt = DEFAULT_RTT_MS if rtt is None else rtt
        return rtt / 2000 + HOP_OVERHEAD_S + self.needs.hidden_bytes / LINK_BYTES_PER_S

    def _stage_s(self, node: NodeId, first: int, end: int, per_byte: float) -> float:
        """A prompt chunk's stage time (per token) at `per_byte`."""
        last = end == self.needs.n_layers
        return self.needs.weights(first, end, last) * per_byte + STAGE_OVERHEAD_S

    def _decode_s(self, node: NodeId, first: int, end: int, charge: float = 1.0) -> float:
        return self._cost(node, first, end, charge).seconds(self.extra_context)

    def _cost(self, node: NodeId, first: int, end: int, charge: float) -> StageCost:
        caps = self.nodes[node]
        return StageCost(
            node=node,
            weight_bytes=self.needs.weights(first, end, end == self.needs.n_layers),
            kv_bytes_per_token=self.needs.kv_bytes_per_token_layer * (end - first),
            s_per_byte=caps.decode_s_per_byte,
            charge=charge,
            context_s_per_byte=caps.context_s_per_byte,
        )

    def share_charges(self, nodes: Iterable[NodeId]) -> dict[NodeId, float]:
        """What each of `nodes` (one plan's) pays for sharing its host's cores with the others
        (1.0: alone on its host, or a host with cores enough for all their threads)."""
        by_host: dict[str, list[NodeCaps]] = {}
        for node in nodes:
            caps = self.nodes.get(node)
            if caps is not None and caps.host and caps.cpus > 0:
                by_host.setdefault(caps.host, []).append(caps)
        charges = dict.fromkeys(nodes, 1.0)
        for members in by_host.values():
            cores = min(c.cpus for c in members)
            threads = sum(min(max(c.threads, 1), cores) for c in members)
            charge = 1 + SHARE_COST * max(0, threads - cores) / cores
            for caps in members:
                charges[caps.node_id] = min(charge, MAX_SHARE_CHARGE)
        return charges

    def stage_costs(self, plan: Plan) -> list[StageCost]:
        """The model behind `predict` for each stage of `plan`, at any context length: what
        an observed stage compute is compared with (meshchat.inference.observed_speed)."""
        charges = self.share_charges(plan.nodes)
        return [self._cost(s.node, s.first, s.end, charges[s.node]) for s in plan.stages]

    def predict(self, plan: Plan) -> Prediction:
        charges = self.share_charges(plan.nodes)
        compute = sum(self._decode_s(s.node, s.first, s.end, charges[s.node]) for s in plan.stages)
        route = [self.head, *plan.nodes, self.head]
        network = sum(self.hop_s(a, b) for a, b in itertools.pairwise(route))
        # Prompt chunks flow through the chain: the slowest stage sets the pace.
        slowest = max(
            self._stage_s(s.node, s.first, s.end, self.nodes[s.node].prefill_s_per_byte)
            for s in plan.stages
        )
        return Prediction(compute + network, compute, network, 1.0 / max(slowest, 1e-9))

    # -- checking a hand plan ------------------------------------------------------------------

    def violations(self, plan: Plan, connected: Iterable[NodeId] | None = None) -> list[str]:
        """Every rule `plan` breaks, one sentence each (empty: the plan can run)."""
        problems: list[str] = []
        n = self.needs.n_layers
        online = set(connected) if connected is not None else None
        expected = 0
        for stage in plan.stages:
            if stage.first >= stage.end:
                problems.append(f"stage {stage} on {label(stage.node)} holds no layers")
                continue
            if stage.first > expected:
                problems.append(f"layers [{expected},{stage.first}) are not covered")
            elif stage.first < expected:
                problems.append(
                    f"layers [{stage.first},{min(expected, stage.end)}) are covered twice"
                )
            if 0 < stage.first < n and stage.first not in self.needs.allowed:
                problems.append(f"layer {stage.first} is not an allowed split point")
            expected = max(expected, stage.end)
        if expected < n:
            problems.append(f"layers [{expected},{n}) are not covered")
        if expected > n:
            problems.append(f"the model has {n} layers, the plan runs to layer {expected}")
        seen: set[NodeId] = set()
        for stage in plan.stages:
            node = stage.node
            if node in seen:
                problems.append(f"node {label(node)} appears in more than one stage")
            seen.add(node)
            if node not in self.nodes:
                problems.append(f"node {label(node)} is unknown (no capabilities)")
                continue
            if online is not None and node != self.head and node not in online:
                problems.append(f"node {label(node)} is not connected")
            if stage.first >= stage.end or stage.end > n:
                continue
            if not self.matches(node, stage.first, stage.end):
                problems.append(
                    f"node {label(node)} has a different model for layers {stage} "
                    "(fingerprint mismatch)"
                )
            last = stage.end == n
            need = self.needs.memory(stage.first, stage.end, last, self.n_ctx, self.sessions)
            have = self.nodes[node].free_memory
            if need > have:
                problems.append(
                    f"node {label(node)} needs about {need // _MIB} MiB for layers {stage} "
                    f"but offers {have // _MIB} MiB"
                )
        return problems

    def check(self, plan: Plan, connected: Iterable[NodeId] | None = None) -> None:
        problems = self.violations(plan, connected)
        if problems:
            raise PlanError("plan rejected: " + "; ".join(problems))

    # -- searching -----------------------------------------------------------------------------

    def _orders(self, max_stages: int) -> Iterable[tuple[NodeId, ...]]:
        """Node chains worth trying: the head first when it takes part; any node last."""
        usable = [n for n in self.nodes if self._match[n][-1] > 0]
        others = sorted(n for n in usable if n != self.head)
        with_head = self.head in usable
        for k in range(1, min(max_stages, len(usable)) + 1):
            for head_in in (True, False) if with_head else (False,):
                rest = k - 1 if head_in else k
                if rest > len(others):
                    continue
                for group in itertools.combinations(others, rest):
                    if len(group) <= 3:
                        perms: Iterable[tuple[NodeId, ...]] = itertools.permutations(group)
                    else:  # hops cost alike on a LAN: only which node is last matters
                        perms = (group[i + 1 :] + group[:i] + (group[i],) for i in range(rest))
                    for perm in perms:
                        yield ((self.head,) if head_in else ()) + perm

    def _best_ranges(self, order: tuple[NodeId, ...]) -> tuple[float, list[int]] | None:
        """Cheapest boundaries for a fixed chain of nodes (dynamic programming over layers)."""
        n, k = self.needs.n_layers, len(order)
        points = [0, *sorted(p for p in self.needs.allowed if 0 < p < n), n]
        inf = float("inf")
        cost = {0: 0.0}
        back: list[dict[int, int]] = []
        charges = self.share_charges(order)
        for j, node in enumerate(order):
            nxt: dict[int, float] = {}
            choice: dict[int, int] = {}
            ends = [n] if j == k - 1 else [p for p in points if 0 < p < n]
            for end in ends:
                best, arg = inf, -1
                for first, base in cost.items():
                    if first >= end or not self.matches(node, first, end):
                        continue
                    if not self.fits(node, first, end):
                        continue
                    total = base + self._decode_s(node, first, end, charges[node])
                    if total < best:
                        best, arg = total, first
                if arg >= 0:
                    nxt[end], choice[end] = best, arg
            if not nxt:
                return None
            cost = nxt
            back.append(choice)
        if n not in cost:
            return None
        edges = [n]
        for choice in reversed(back):
            edges.append(choice[edges[-1]])
        edges.reverse()
        route = [self.head, *order, self.head]
        hops = sum(self.hop_s(a, b) for a, b in itertools.pairwise(route))
        return cost[n] + hops, edges

    def search(self, max_stages: int = 8, min_stages: int = 1) -> list[tuple[float, Plan]]:
        """Feasible plans, cheapest first (one per chain of nodes)."""
        found = []
        for order in self._orders(max_stages):
            if len(order) < min_stages:
                continue
            result = self._best_ranges(order)
            if result is None:
                continue
            total, edges = result
            stages = tuple(
                StagePlan(node, a, b)
                for node, (a, b) in zip(order, itertools.pairwise(edges), strict=True)
            )
            # Ties: fewer stages, then the head taking part.
            found.append((total, len(order), order[0] != self.head, Plan(stages)))
        found.sort(key=lambda item: item[:3])
        return [(total, plan) for total, _, _, plan in found]

    def best(self, max_stages: int = 8, min_stages: int = 1) -> PlanChoice:
        """The plan with the least predicted time per token, and advice on splitting."""
        candidates = self.search(max_stages, min_stages)
        if not candidates:
            raise PlanError(self._why_nothing_fits())
        plan = candidates[0][1]
        prediction = self.predict(plan)
        singles = [p for _, p in self.search(1)] if min_stages <= 1 else []
        single = self.predict(singles[0]) if singles else None
        return PlanChoice(plan, prediction, self._advice(plan, prediction, single), single)

    def _advice(self, plan: Plan, prediction: Prediction, single: Prediction | None) -> str:
        k = len(plan.stages)
        if single is None:
            return (
                f"the model fits on no single node; splitting over {k} nodes "
                f"(predicted {prediction.decode_tok_s:.1f} tok/s)"
            )
        if k == 1:
            splits = [p for _, p in self.search(8, 2)]
            if splits:
                other = self.predict(splits[0])
                return (
                    f"splitting is not worth it: one node predicts "
                    f"{prediction.decode_tok_s:.1f} tok/s, the best split over "
                    f"{len(splits[0].stages)} nodes {other.decode_tok_s:.1f} tok/s"
                )
            return f"one node runs the model (predicted {prediction.decode_tok_s:.1f} tok/s)"
        return (
            f"splitting over {k} nodes predicts {prediction.decode_tok_s:.1f} tok/s "
            f"against {single.decode_tok_s:.1f} tok/s on one node"
        )

    def _why_nothing_fits(self) -> str:
        usable = [n for n in self.nodes if self._match[n][-1] > 0]
        if not usable:
            return "no node has this model (fingerprints differ): nothing can run it"
        offers = sorted((self.nodes[n].free_memory for n in usable), reverse=True)
        solo = self.needs.memory(0, self.needs.n_layers, True, self.n_ctx, self.sessions)
        largest = offers[0]
        short = (solo - largest) // _MIB + 1
        head = (
            f"no plan fits: the model needs about {solo // _MIB} MiB on one node, {short} MiB "
            f"more than the largest offer ({largest // _MIB} MiB of {len(usable)} usable node(s))"
        )
        return f"{head}; {self._what_would_fit(largest)}"

    def _what_would_fit(self, largest: int) -> str:
        """The fewest nodes of the largest offer's size that could hold the model, else the
        least memory per node any split needs."""
        least: tuple[int, int] | None = None
        for k, size in enumerate(self.split_memories(MAX_STAGES)[1:], start=2):
            if size <= largest:
                return f"it would run on {k} nodes offering {size // _MIB + 1} MiB each"
            if least is None or size < least[0]:
                least = (size, k)
        if least is None:
            return "add a node with more memory or give it a larger --max-memory"
        size, k = least
        return (
            f"no split needs less than {size // _MIB + 1} MiB per node ({k} nodes): "
            "add nodes with more memory or give them a larger --max-memory"
        )

    def split_memory(self, k: int) -> int | None:
        """The least memory every node must offer for the model to run on `k` nodes (the
        largest stage of the most even split); None if the model has fewer than k spans."""
        sizes = self.split_memories(k)
        return sizes[k - 1] if k <= len(sizes) else None

    def split_memories(self, max_k: int) -> list[int]:
        """`split_memory(k)` for k = 1.. up to max_k (fewer if the model has fewer spans)."""
        n = self.needs.n_layers
        points = [0, *sorted(p for p in self.needs.allowed if 0 < p < n), n]
        spans = range(len(points))
        need = {
            (h, i): self.needs.memory(points[h], points[i], i == len(points) - 1, self.n_ctx,
                                      self.sessions)
            for i in spans for h in range(i)
        }  # fmt: skip
        # worst[i]: the least largest stage covering [0, points[i]) with the stages so far.
        inf = float("inf")
        worst: list[float] = [0.0] + [inf] * (len(points) - 1)
        sizes: list[int] = []
        for _ in range(min(max_k, len(points) - 1)):
            worst = [inf] + [
                min(max(worst[h], need[h, i]) for h in range(i)) for i in spans if i > 0
            ]
            sizes.append(int(worst[-1]))
        return sizes

    def assign(
        self, ranges: list[tuple[int, int]], connected: Iterable[NodeId] | None = None
    ) -> Plan:
        """Put hand-chosen layer ranges on nodes: the head first, the rest where they fit best."""
        online = set(connected) if connected is not None else None
        k = len(ranges)
        candidates = [n for n in self.nodes if n == self.head or online is None or n in online]
        if k > len(candidates):
            raise PlanError(
                f"the split has {k} stages but only {len(candidates)} node(s) can take part"
            )
        others = sorted(n for n in candidates if n != self.head)
        firsts = [self.head] if self.head in candidates else []
        # The head runs stage 0 when it can (no hop before the first stage); else others do.
        orders = itertools.chain(
            ((*firsts, *perm) for perm in itertools.permutations(others, k - len(firsts))),
            itertools.permutations(others, k) if firsts else (),
        )
        best: tuple[float, Plan] | None = None
        for order in itertools.islice(orders, 5000):
            plan = Plan(
                tuple(StagePlan(node, a, b) for node, (a, b) in zip(order, ranges, strict=True))
            )
            if self.violations(plan, online):
                continue
            t = self.predict(plan).decode_s
            if best is None or t < best[0]:
                best = (t, plan)
        if best is not None:
            return best[1]
        default = tuple(firsts + others)[:k]
        plan = Plan(
            tuple(StagePlan(node, a, b) for node, (a, b) in zip(default, ranges, strict=True))
        )
        self.check(plan, online)  # raises with this assignment's problems
        raise PlanError("no assignment of the split to nodes fits")
