"""Every timeout of the mesh in one place: how long each wait may last, and why that long.

One instance, `TIMEOUTS`, read where each wait happens (tests set one field with
`monkeypatch.setattr(TIMEOUTS, "auth_s", 0.5)`). Transport knobs of QUIC itself, such as its
idle timeout, stay with the other transport knobs in `meshchat.mesh.transport.Tuning`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

LOAD_ENV = "MESHCHAT_TEST_LOAD_TIMEOUT"  # test hook: a tiny load timeout in worker processes


@dataclass
class Timeouts:
    # -- mesh ---------------------------------------------------------------------------------
    # Each frame of the member handshake (after QUIC's own): a LAN answers in milliseconds, and
    # a stranger may not hold a connection slot longer.
    auth_s: float = 5.0
    # A request and its one reply on a stream of their own (capabilities, plans, layer chunks).
    request_s: float = 30.0
    # A side-path message with no acknowledgement for this long: the connection is closed and
    # the node's failover takes over (QUIC itself idles out at 15 s).
    side_path_give_up_s: float = 10.0
    # -- inference ------------------------------------------------------------------------------
    # A peer's capabilities: it may be calibrating its engine on its first start.
    caps_s: float = 150.0
    # A session operation (open, sample, rollback, close) through the whole chain.
    session_op_s: float = 30.0
    # A stage loading its layers from disk; a fetch over the LAN gets its own allowance on
    # top (meshchat.inference.seeding).
    load_s: float = 300.0
    # A fetch is allowed its bytes at the slowest link rate plus this, before `load_s` starts.
    fetch_slack_s: float = 60.0
    # One step through the chain, plus `step_per_token_s` per token (long prompts).
    step_s: float = 60.0
    step_per_token_s: float = 0.05
    # An engine probe that runs longer has hung: generous, since a slow disk pages in the
    # weights first (SmolLM2's probe takes about 1 s here), plus this much per GiB of weights.
    probe_s: float = 60.0
    probe_per_gib_s: float = 60.0

    def step(self, n_tokens: int) -> float:
        return self.step_s + self.step_per_token_s * n_tokens

    def probe(self, weight_bytes: int) -> float:
        return self.probe_s + self.probe_per_gib_s * weight_bytes / (1 << 30)


TIMEOUTS = Timeouts(load_s=float(os.environ.get(LOAD_ENV, Timeouts.load_s)))
