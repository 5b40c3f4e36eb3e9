"""The app's mesh side: the in-app node, the split editor and the planner behind it, the
peers table, and the mesh actions (invite, join, remove a member)."""

import asyncio
import logging
from dataclasses import replace
from typing import Any

from textual import on, work

from meshchat.errors import MeshchatError
from meshchat.inference.mesh_pipeline import FailoverNote
from meshchat.inference.serving import clearly_better
from meshchat.mesh.identity import NodeId
from meshchat.tui import messages as msg
from meshchat.tui.app_base import AppBase, worker_error
from meshchat.tui.mesh_view import NodeMesh, PeerRow, own_seeding
from meshchat.tui.planning import MeshPlanning
from meshchat.tui.screens.dialogs import AskText, Confirm, Pick, ShowInvite
from meshchat.tui.split import SELF, Owner, SplitPlan, layout_label
from meshchat.tui.widgets.mesh_panel import MeshPanel
from meshchat.tui.widgets.peers import PeersTable
from meshchat.tui.widgets.split_editor import SplitEditor

log = logging.getLogger(__name__)


class MeshMixin(AppBase):
    @work(exclusive=True, group="mesh", exit_on_error=False)
    async def _start_mesh(self) -> None:
        try:
            if self._mesh_factory is not None:
                mesh = await self._mesh_factory()
            else:
                mesh = await NodeMesh.start(self.data, self.config.listen, self.config.mdns)
        except Exception as exc:
            self.post_message(msg.MeshFailed(worker_error(exc, "mesh start")))
            return
        self.post_message(msg.MeshReady(mesh))

    def on_mesh_ready(self, event: msg.MeshReady) -> None:
        self.mesh = event.mesh
        self.mesh_error = ""
        self._update_mesh_title()
        self._publish_status()
        self._refresh_peers()
        self._maybe_start_planning()
        if self.options.join_code:
            self._join(self.options.join_code)

    def on_mesh_failed(self, event: msg.MeshFailed) -> None:
        self.mesh_error = event.error
        self._update_mesh_title()
        self.notify(
            f"{event.error}. Chat works on this machine alone.",
            title="Mesh",
            severity="warning",
            timeout=15,
        )
        self._refresh_peers()

    def _update_mesh_title(self) -> None:
        panel = self.mesh_panel
        if self.mesh is not None:
            addresses = self.mesh.addresses
            where = f" at {addresses[0]}" if addresses else ""
            panel.border_title = f"Mesh · node {self.mesh.name}{where}"
        else:
            panel.border_title = f"Mesh · offline: {self.mesh_error}" if self.mesh_error else "Mesh"

    def _publish_status(self) -> None:
        """Tell the mesh which layers this node runs and which model file it has."""
        if self.mesh is None or self.engine is None or self.split.applied is None:
            return
        if not self.engine.is_local:
            return  # the mesh pipeline says what this node serves
        mine = [s for s in self.split.applied.segments if s.node is SELF]
        layers = (mine[0].start, mine[-1].end) if mine else None
        info = self.engine.info
        model: dict[str, Any] = {"name": info.name, "path": str(info.path)}
        if self.planning is not None:
            model.update(self.planning.model_status)
        self.mesh.set_status(layers, model)

    def action_focus_split(self) -> None:
        self._show_mesh_panel()
        self.split.focus()

    def action_focus_peers(self) -> None:
        self._show_mesh_panel()
        self.peers_table.focus()

    def _show_mesh_panel(self) -> None:
        self.mesh_panel.display = True
        self.mesh_panel.open()

    def action_toggle_mesh(self) -> None:
        panel = self.mesh_panel
        panel.display = not panel.display
        if not panel.display:
            self.prompt.focus()

    @on(SplitEditor.Apply)
    def _on_split_apply(self, event: SplitEditor.Apply) -> None:
        """The editor checked the plan against the planner; the app checks its own state."""
        if self.engine is None:
            self.split.say("no model loaded", error=True)
        elif self.generation is not None:
            self.split.say("wait for the answer to finish (or Esc), then apply", error=True)
        else:
            self.split.applying(event.plan)
            self._refresh_peers()
            self._apply_split(event.plan)

    @work(exclusive=True, group="split", exit_on_error=False)
    async def _apply_split(self, plan: SplitPlan, reason: str = "") -> None:
        engine = self.engine
        assert engine is not None
        try:
            if plan.is_local:
                await engine.resplit(plan.boundaries)
            else:
                assert self.planning is not None
                pipeline = await self.planning.start(plan, engine.pipeline)
                pipeline.on_failover = self._on_failover
                await engine.switch(pipeline, plan.ranges)
                plan = self.planning.running(pipeline, plan.n_layers) or plan
        except Exception as exc:
            self.post_message(msg.SplitFailed(worker_error(exc, "re-split")))
        else:
            self.post_message(msg.SplitApplied(plan, reason))

    def _on_failover(self, note: FailoverNote) -> None:
        """From the mesh pipeline (on the app's loop): mute its text notes, show this one."""
        self.mesh_watch.failover_active = not note.plan
        self.post_message(msg.FailoverNoted(note))

    async def on_failover_noted(self, event: msg.FailoverNoted) -> None:
        note = event.note
        text = self._failover_text(note)
        if note.lost:
            self.mesh_watch.failed_over.add(note.lost)
        gen = self.generation
        if gen is not None and note.plan:
            gen.replans += 1
            if gen.view.notes:
                gen.view.update_note(text)  # "re-planning…" becomes "continuing on …"
            else:
                await gen.view.add_note(text)
        elif gen is not None:
            await gen.view.add_note(text)
        elif note.plan:  # not inside an answer: the one toast says it
            self.notify(text, title="Failover", severity="warning", timeout=10)
        self._refresh_peers()

    def _failover_text(self, note: FailoverNote) -> str:
        if note.lost:
            rows = {r.key: r for r in (self.mesh.peers() if self.mesh else [])}
            row = rows.get(note.lost)
            gone = "left" if row is not None and row.state == "left" else "lost"
            who = f"worker {note.lost.short} {gone}"
        else:
            who = f"a stage failed ({note.reason})"
        if not note.plan:
            return f"⚠ {who}; re-planning…"
        return f"⚠ {who}; continuing on {note.plan}"

    def on_split_applied(self, event: msg.SplitApplied) -> None:
        moved = f"moved to {event.plan.describe()}: {event.reason}" if event.reason else ""
        self.split.applied_ok(event.plan, moved)
        if moved:
            self.mesh_panel.post_message(MeshPanel.Moved(moved))
        self.status.set(layout=layout_label(event.plan), context_used=self._count_context())
        self._publish_status()
        self._refresh_peers()
        self._replan_between_turns()

    def on_split_failed(self, event: msg.SplitFailed) -> None:
        self.split.apply_failed(event.error)
        self._replan_between_turns()

    # --- re-planning between turns (the API head's rule, issue 16) ---------------------------

    def on_turn_ended(self, event: msg.TurnEnded) -> None:
        self._refresh_peers()  # this node's row: no longer "generating"
        self._replan_between_turns()

    def _replan_between_turns(self) -> None:
        """After a member joined or returned: once no answer is being written and no plan is
        being applied, move to a clearly faster plan, or plan again if the last one failed."""
        if not self.mesh_watch.replan_due or self.generation is not None or self.split.busy:
            return  # the turn (or the apply) ends first: this runs again then
        if self.engine is None or self.planning is None:
            return
        why, self.mesh_watch.replan_due = self.mesh_watch.replan_due, ""
        self._seek_plan(why)

    @work(exclusive=True, group="replan", exit_on_error=False)
    async def _seek_plan(self, why: str) -> None:
        engine, planning = self.engine, self.planning
        if engine is None or planning is None:
            return
        n_layers = engine.info.n_layers
        broken = getattr(engine.pipeline, "broken", None)
        try:
            if broken:  # no plan fitted after a failover: any plan that fits now will do
                plan, _, _ = await planning.coordinator.choose()
                reason = f"{why}; the last plan had failed ({broken})"
            else:
                base = planning.running(engine.pipeline, n_layers) or self.split.applied
                if base is None:
                    return
                better = await clearly_better(planning.coordinator, planning.to_plan(base))
                if better is None:
                    return  # not 20% faster: moving costs a reload on every node
                plan, reason = better[0], f"{why}; {better[1]}"
        except Exception as exc:  # no plan fits yet: the next join tries again
            log.info("re-plan after %s: %s", why, worker_error(exc, "re-plan"))
            return
        if self.generation is not None or self.split.busy or self.engine is not engine:
            self.mesh_watch.replan_due = why  # never move during an answer
            return
        target = planning.from_plan(plan, n_layers)
        self.split.applying(target)
        self._refresh_peers()
        self._apply_split(target, reason)

    # --- the mesh planner -------------------------------------------------------------------

    def _maybe_start_planning(self) -> None:
        node = self.mesh.planning_node() if self.mesh is not None else None
        if node is not None and self.engine is not None and self.planning is None:
            self._setup_planning(node)

    @work(exclusive=True, group="planning", exit_on_error=False)
    async def _setup_planning(self, node: Any) -> None:
        engine = self.engine
        assert engine is not None
        planning_line = "planning: asking the other nodes what they can run…"
        self.mesh_panel.post_message(MeshPanel.Activity(planning_line))

        def notify(text: str) -> None:
            if self.generation is not None or self.mesh_watch.failover_active:
                log.info("mesh: %s", text)  # the answer's inline note says it (one toast)
                return
            self.notify(text, title="Mesh")

        try:
            planning = await asyncio.to_thread(
                MeshPlanning.create,
                node,
                engine.info.path,
                self.data,
                threads=engine.options.n_threads,
                n_ctx=engine.options.n_ctx,
                notify=notify,
            )
            await planning.refresh()
        except Exception as exc:
            error = worker_error(exc, "planner start")
            self.post_message(msg.MeshActionDone("", f"the planner is unavailable: {error}"))
            self.mesh_panel.post_message(MeshPanel.Activity(""))
            return
        self.post_message(msg.PlanningReady(planning))

    def on_planning_ready(self, event: msg.PlanningReady) -> None:
        self.mesh_panel.post_message(MeshPanel.Activity(""))
        self.planning = event.planning
        self.split.planner = event.planning
        self.split.refresh()  # the same planner knows the nodes anew
        self._publish_status()
        self._refresh_peers()
        for note in event.planning.notes:
            if note not in self.mesh_watch.told:
                self.mesh_watch.told.add(note)
                self.notify(note, title="Mesh", severity="warning")
        self._advise(event.planning)
        self._replan_between_turns()

    def _advise(self, planning: MeshPlanning) -> None:
        """When other nodes can take layers, say once what the planner would do with them."""
        usable = frozenset(planning.usable())
        if not usable or usable == self.mesh_watch.advised_for or self.engine is None:
            return
        self.mesh_watch.advised_for = usable
        try:
            _, advice = planning.auto(self.engine.info.n_layers)
        except (MeshchatError, ValueError):
            return
        self.notify(
            f"{advice}. Ctrl+L then a shows that plan; n gives a stage to a node; Enter applies.",
            title="Planner",
            timeout=12,
        )

    @work(exclusive=True, group="caps", exit_on_error=False)
    async def _refresh_caps(self) -> None:
        planning = self.planning
        if planning is None:
            return
        try:
            await planning.refresh()
        except Exception as exc:  # a peer that cannot answer: keep the previous answers
            log.info("capabilities refresh failed: %s", exc)
        self.post_message(msg.PlanningReady(planning))

    def _refresh_peers(self) -> None:
        rows: list[PeerRow] = [self._self_row()]
        if self.mesh is not None:
            try:
                rows += self.mesh.peers()
            except Exception:
                log.exception("reading peers failed")
        loading = self.split.loading_nodes
        if loading:
            rows = [replace(r, state="loading") if r.key in loading else r for r in rows]
        self.peers_table.sync(rows, self._shares())
        self.mesh_panel.post_message(MeshPanel.Nodes(len(rows) - 1))
        self._note_lost_peers(rows)
        self._note_refusals()
        self._follow_mesh_plan()
        if self.mesh is not None:
            names = {r.key: r.name for r in rows if isinstance(r.key, NodeId)}
            if self.planning is not None:
                usable = self.planning.usable()
            else:
                usable = self.mesh.usable_nodes(None) if self.engine else []
            self.split.set_nodes(names, usable)

    def _follow_mesh_plan(self) -> None:
        """After a failover the mesh pipeline runs another plan: show that one."""
        engine, planning = self.engine, self.planning
        if engine is None or planning is None:
            return
        running = planning.running(engine.pipeline, engine.info.n_layers)
        if running is not None and self.split.follow(running):
            self.status.set(layout=layout_label(running))

    def _note_lost_peers(self, rows: list[PeerRow]) -> None:
        """Say so when a member that was connected is lost (and when it comes back)."""
        states = {r.key: r.state for r in rows if r.member and isinstance(r.key, NodeId)}
        up = {k for k, v in states.items() if v in ("idle", "serving")}
        was_up = {k for k, v in self.mesh_watch.peer_states.items() if v in ("idle", "serving")}
        # Up again after loading its layers for our own plan is no join.
        came = sorted(k for k in up - was_up if self.mesh_watch.peer_states.get(k) != "loading")
        if came:
            names = {r.key: r.name for r in rows}
            verb = "returned" if any(k in self.mesh_watch.peer_states for k in came) else "joined"
            self.mesh_watch.replan_due = f"node {', '.join(names[k] for k in came)} {verb}"
        if up != was_up and self.planning is not None:
            self._refresh_caps()  # who may take layers changed: ask the nodes again
        for key, state in states.items():
            before = self.mesh_watch.peer_states.get(key)
            name = next(r.name for r in rows if r.key == key)
            told = key in self.mesh_watch.failed_over  # the answer's inline note said it already
            if state in ("lost", "left") and before in ("idle", "serving", "loading") and not told:
                if state == "left":
                    self.notify(f"node {name} left the mesh (stopped)", title="Peer")
                else:
                    self.notify(
                        f"node {name} stopped answering (lost); it is retried in the background",
                        title="Peer lost",
                        severity="warning",
                        timeout=10,
                    )
            elif before in ("lost", "left") and state in ("idle", "serving"):
                self.mesh_watch.failed_over.discard(key)
                self.notify(f"node {name} is back", title="Peer")
        self.mesh_watch.peer_states = states

    def _note_refusals(self) -> None:
        """Say when this node refused a connection (a join with a stale invite, a removed
        member): the joiner only sees a timeout or a refusal on its own machine."""
        if self.mesh is None:
            return
        refused = self.mesh.new_refusals()
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            self.notify(refused[-1] + more, title="Join refused", severity="warning", timeout=10)

    def _self_row(self) -> PeerRow:
        plan = self.split.applied
        mine = [s for s in plan.segments if s.node is SELF] if plan else []
        layers = (mine[0].start, mine[-1].end) if mine else None
        if self.engine is None:
            state = "error" if self.model_error else "loading"
        elif self.generation is not None:
            state = "generating"
        else:
            state = "serving" if layers else "idle"
        mesh = self.mesh
        return PeerRow(
            key=SELF,
            name=mesh.name if mesh else "this node",
            address=mesh.addresses[0] if mesh and mesh.addresses else "",
            via="this node, mesh offline" if self.mesh_error else "this node",
            rtt_ms=None,
            layers=layers,
            state=state,
            member=True,
            model=self._model_label(),
            seeding=own_seeding(mesh),
        )

    def _shares(self) -> dict[Owner, str]:
        """Per node: its share of per-token time (compute), and the network's on this row."""
        engine = self.engine
        if engine is None:
            return {}
        if engine.is_local:
            return {SELF: self._self_share()}
        step = getattr(engine.pipeline, "last_step", None)
        plan = getattr(engine.pipeline, "plan", None)
        if step is None or plan is None or step.wall_s <= 0 or not step.stage_compute_s:
            return {}
        shares: dict[Owner, str] = {}
        for stage, compute in zip(plan.stages, step.stage_compute_s, strict=False):
            key: Owner = SELF if self.planning and stage.node == self.planning.head else stage.node
            shares[key] = f"compute {round(100 * compute / step.wall_s)}%"
        net = round(100 * step.network_s / step.wall_s)
        shares[SELF] = f"{shares.get(SELF, 'compute 0%')} · net {net}%"
        return shares

    def _self_share(self) -> str:
        """Compute share of the last answer's time spent on this node's stages."""
        engine = self.engine
        if engine is None:
            return "—"
        stats = engine.last_stats
        total = (stats.ttft_s or 0.0) + stats.decode_s
        if total <= 0:
            return "—"
        compute = sum(s.compute_s for s in engine.stage_shares())
        return f"compute {min(100, round(100 * compute / total))}%"

    def action_invite(self) -> None:
        mesh = self.mesh
        if mesh is None:
            self.notify(self.mesh_error or "the mesh node is still starting", severity="warning")
            return
        try:
            code = mesh.create_invite(uses=1, ttl=3600.0)
        except MeshchatError as exc:
            self.notify(str(exc), severity="error")
            return
        self.push_screen(ShowInvite(code, "valid for an hour"))

    def action_join(self) -> None:
        if self.mesh is None:
            self.notify(self.mesh_error or "the mesh node is still starting", severity="warning")
            return

        def check(code: str) -> str | None:
            from meshchat.mesh.invites import InviteCode

            try:
                InviteCode.parse(code.strip())
            except MeshchatError as exc:
                return str(exc)
            return None

        def done(code: str | None) -> None:
            if code:
                self._join(code)

        self.push_screen(
            AskText(
                "Join a mesh with an invite code",
                placeholder="mc1…",
                hint="Get a code with F5 in meshchat, or from `meshchat --headless` output.",
                check=check,
            ),
            done,
        )

    @work(group="mesh-action", exit_on_error=False)
    async def _join(self, code: str) -> None:
        mesh = self.mesh
        if mesh is None:
            return
        panel = self.mesh_panel
        panel.post_message(MeshPanel.Activity("joining a mesh with the invite code…"))
        try:
            inviter = await mesh.join(code)
        except Exception as exc:
            error = f"join failed: {worker_error(exc, 'join')}"
            self.post_message(msg.MeshActionDone("", error))
            panel.post_message(MeshPanel.Activity(f"{error} (F6 to try another code)", error=True))
        else:
            self.post_message(msg.MeshActionDone(f"joined the mesh of {inviter}"))
            panel.post_message(MeshPanel.Activity(""))

    def on_mesh_action_done(self, event: msg.MeshActionDone) -> None:
        if event.error:
            self.notify(event.error, title="Mesh", severity="error", timeout=10)
        else:
            self.notify(event.text, title="Mesh")
        self._publish_status()
        self._refresh_peers()

    def _members(self) -> dict[NodeId, PeerRow]:
        if self.mesh is None:
            return {}
        rows = self.mesh.peers()
        return {r.key: r for r in rows if r.member and isinstance(r.key, NodeId)}

    def action_remove_member(self) -> None:
        members = self._members()
        if not members:
            self.notify("no other member in this mesh", severity="warning")
            return

        by_text = {str(node): node for node in members}  # a Pick option's id is text

        def chosen(key: str | None) -> None:
            if key in by_text:
                self._confirm_remove(by_text[key])

        self.push_screen(
            Pick(
                "Remove which member? It cannot come back with that identity.",
                [(str(n), f"{r.name}  {r.address}  {r.state}") for n, r in members.items()],
            ),
            chosen,
        )

    @on(PeersTable.RemoveRequested)
    def _on_remove_requested(self, event: PeersTable.RemoveRequested) -> None:
        if event.key is SELF:
            self.notify("this is you: a node cannot remove itself", severity="warning")
        elif not isinstance(event.key, NodeId) or event.key not in self._members():
            self.notify("only members can be removed", severity="warning")
        else:
            self._confirm_remove(event.key)

    def _confirm_remove(self, key: NodeId) -> None:
        def done(yes: bool | None) -> None:
            if yes:
                self._remove(key)

        self.push_screen(Confirm(f"Remove node {key.short} from the mesh?", yes="Remove"), done)

    @work(group="mesh-action", exit_on_error=False)
    async def _remove(self, key: NodeId) -> None:
        mesh = self.mesh
        if mesh is None:
            return
        try:
            await mesh.remove(key)
        except Exception as exc:  # the branch it lacked: a bug here failed silently
            error = worker_error(exc, "remove")
            self.post_message(msg.MeshActionDone("", f"remove failed: {error}"))
        else:
            self.post_message(msg.MeshActionDone(f"removed {key.short} from the mesh"))
