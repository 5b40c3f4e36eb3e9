"""Pilot tests of the split editor, the peers table and the mesh actions (keys and mouse)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from meshchat.mesh.identity import Identity
from meshchat.mesh.invites import InviteBook
from meshchat.tui.split import SELF
from tests.tui_helpers import CAPITAL, PEER_A, FakeMesh, ask, make_app, ready, two_peers, wait_for

pytestmark = pytest.mark.timeout(120)


async def test_split_editor_moves_applies_and_keeps_answers(tmp_path: Path, smollm2: Path) -> None:
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        solo = await ask(pilot, CAPITAL)
        await pilot.press("ctrl+l")
        split = app.split
        assert split.has_focus and split.plan and split.plan.ranges == [(0, 30)]
        await pilot.press("plus")  # split the only stage at its middle
        assert split.plan.ranges == [(0, 15), (15, 30)] and split.edited
        await pilot.press("right", "right")  # stage 0's end moves to 17
        assert split.plan.ranges == [(0, 17), (17, 30)]
        assert app.engine and app.engine.ranges == [(0, 30)]  # nothing applied yet
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.engine and app.engine.ranges == [(0, 17), (17, 30)])
        await wait_for(pilot, lambda: not split.busy)
        assert not split.edited and "running [0,17) [17,30)" in split.message
        assert "local, 2 stages" in app.status.info.layout
        # Two in-process stages give exactly the solo answer (greedy).
        await pilot.press("ctrl+n")
        assert await ask(pilot, CAPITAL) == solo
        # The peers table shows this node's range.
        await pilot.pause(1.2)
        assert app.peers_table.get_cell(str(SELF), "layers").plain == "[0,30)"
        # Merge back (-) and apply: one stage again.
        await pilot.press("ctrl+l", "minus", "enter")
        await wait_for(pilot, lambda: app.engine and app.engine.ranges == [(0, 30)])


async def test_invalid_split_edits_are_explained_not_applied(tmp_path: Path, smollm2: Path) -> None:
    app = make_app(tmp_path, smollm2)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        split = app.split
        await pilot.press("ctrl+l")
        await pilot.press("left")
        assert split.is_error and "press + to split" in split.message
        await pilot.press("plus", "plus")  # [0,8) [8,15) [15,30)? no: splits stage 0 twice
        assert split.plan and len(split.plan.segments) == 3
        first, second = split.plan.boundaries
        # Move stage 0's end right until it would swallow stage 1: refused, with the reason.
        for _ in range(second - first - 1):
            await pilot.press("right")
        assert split.plan.boundaries == [second - 1, second] and not split.is_error
        await pilot.press("right")
        assert split.is_error and "would have no layers left" in split.message
        assert split.plan.boundaries == [second - 1, second]
        # Down to layer 1, then no allowed split point before it.
        for _ in range(second - 2):
            await pilot.press("left")
        assert split.plan.boundaries[0] == 1
        await pilot.press("left")
        assert split.is_error and "no allowed split point before layer 1" in split.message
        # No other node: assigning a stage elsewhere is refused.
        await pilot.press("n")
        assert split.is_error and "no other node can take layers" in split.message
        # u undoes every edit; nothing ever reached the engine.
        await pilot.press("u")
        assert split.plan.ranges == [(0, 30)] and not split.edited
        assert app.engine and app.engine.ranges == [(0, 30)]


async def test_split_to_another_node_and_mouse(tmp_path: Path, smollm2: Path) -> None:
    mesh = two_peers()
    app = make_app(tmp_path, smollm2, mesh=mesh)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        await pilot.pause(1.2)  # a peers refresh tells the editor who may take layers
        split = app.split
        await pilot.press("ctrl+l", "plus", "right_square_bracket", "n")
        assert split.plan and split.plan.nodes == [SELF, PEER_A]
        # A click on the bar moves the nearest boundary to the layer under the pointer.
        width = split.content_size.width
        await pilot.click("#split", offset=(1 + width * 10 // 30, 1))
        assert split.plan.boundaries == [10]
        assert split.plan.nodes == [SELF, PEER_A]
        await pilot.press("enter")
        await pilot.pause()
        if app.split.is_error:  # a scripted mesh has no planner: refused, with the reason
            assert "mesh is up" in split.message
            assert app.engine and app.engine.ranges == [(0, 30)]
        # The auto plan: every layer on this node, shown but only applied with Enter.
        await pilot.press("a")
        await pilot.pause()
        assert split.plan.ranges == [(0, 30)]


async def test_peers_table_updates_cells_by_key(tmp_path: Path, smollm2: Path) -> None:
    mesh = two_peers()
    app = make_app(tmp_path, smollm2, mesh=mesh)
    async with app.run_test(size=(110, 32)) as pilot:
        await ready(pilot)
        await pilot.pause(1.2)
        table = app.peers_table
        assert [k.value for k in table.rows] == [str(SELF), str(PEER_A), str(mesh.rows[1].key)]
        assert table.get_cell(str(PEER_A), "rtt").plain == "800 µs"
        assert table.get_cell(str(mesh.rows[1].key), "via").plain == "mdns, not a member"
        row_keys = list(table.rows)
        table.move_cursor(row=1)
        assert table.get_cell(str(PEER_A), "memory").plain == "—"
        mesh.rows[0] = replace(
            mesh.rows[0], rtt_ms=2.5, layers=(15, 30), state="serving", memory="162/180 MiB"
        )
        await pilot.pause(1.2)
        assert table.get_cell(str(PEER_A), "rtt").plain == "2.5 ms"
        assert table.get_cell(str(PEER_A), "memory").plain == "162/180 MiB"
        assert table.get_cell(str(PEER_A), "layers").plain == "[15,30)"
        assert table.get_cell(str(PEER_A), "state").plain == "serving"
        assert list(table.rows) == row_keys and table.cursor_row == 1  # not rebuilt
        # A peer that leaves the mesh view loses its row; the others stay.
        mesh.rows.pop(1)
        await pilot.pause(1.2)
        assert [k.value for k in table.rows] == [str(SELF), str(PEER_A)]


def _real_invite(tmp_path: Path) -> str:
    inviter = Identity.generate().node_id
    book = InviteBook(tmp_path / "invites.json")
    return book.issue(inviter, [("127.0.0.1", 47470)], 1, 3600.0).encode()


async def test_invite_join_and_remove(tmp_path: Path, smollm2: Path) -> None:
    mesh = two_peers()
    app = make_app(tmp_path, smollm2, mesh=mesh)
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        # F5 shows an invite code; c copies it.
        await pilot.press("f5")
        assert mesh.invites == ["mc1fakeinvite0"]
        await pilot.press("c")
        assert app.clipboard == "mc1fakeinvite0"
        await pilot.press("escape")
        # F6 asks for a code; a malformed one is explained inline and not used.
        await pilot.press("f6")
        await pilot.pause()
        dialog = app.screen
        await pilot.press(*"mc1garbage", "enter")
        assert app.screen is dialog and str(dialog.query_one("#error").render())
        assert mesh.joined == []
        code = _real_invite(tmp_path)
        dialog.query_one("#answer").value = code  # type: ignore[attr-defined]
        await pilot.press("enter")
        await wait_for(pilot, lambda: mesh.joined == [code])
        # F7 lists members only (not the nearby node); Enter picks, y confirms.
        await pilot.press("f7")
        await pilot.press("enter")
        await pilot.press("y")
        await wait_for(pilot, lambda: mesh.removed == [PEER_A])
        # From the peers table: this node cannot be removed.
        await pilot.press("ctrl+t")
        assert app.peers_table.has_focus
        app.peers_table.move_cursor(row=0)
        await pilot.press("d")
        await pilot.pause()
        assert mesh.removed == [PEER_A] and app.screen is app.screen_stack[0]


async def test_mesh_failure_is_shown_and_chat_still_works(tmp_path: Path, smollm2: Path) -> None:
    async def broken() -> FakeMesh:
        from meshchat.errors import MeshchatError

        raise MeshchatError("cannot listen on 127.0.0.1:1: permission denied")

    app = make_app(tmp_path, smollm2)
    app._mesh_factory = broken
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(pilot)
        assert app.mesh is None and "permission denied" in app.mesh_error
        assert "offline" in str(app.query_one("#mesh").border_title)
        await pilot.press("f5")
        assert app.screen is app.screen_stack[0]
        assert "Paris" in await ask(pilot, CAPITAL)
