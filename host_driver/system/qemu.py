"""The seed-004 migration when the VM is a QEMU process whose virtio-net data rings a card VF
serves (vDPA-style, through a vhost-user back-end): QEMU moves the memory and the device
state itself, so the orchestrator drives QEMU instead of copying.

:class:`QemuMigrationOrchestrator` walks the states of
:class:`host_driver.system.migration.MigrationOrchestrator` (selection by T1 / T2, the
guest's SR-IOV assignment, the dummy VM reserving the target's VF, commissioning, retiring the
dummy, freeing the source) with these steps of its own:

==============  ==========================================================================
MOVE_MEMORY     a QEMU started on the target's back-end for the reserved VF, waiting for
                the guest (``-incoming``); QEMU's migration started towards it (QMP
                ``migrate``): pre-copy while the guest runs, the source card logging every
                page its VF writes into QEMU's dirty log
MOVE_VF_STATE   QEMU's switch-over: it stops the source VF's rings (``GET_VRING_BASE``, the
                VF quiesced), carries their indices in its device state and the target's
                back-end resumes the reserved VF from them; the step ends when QEMU reports
                the migration completed (anything else aborts)
FORWARD         the VM is on the target: the source's switch entry for the guest retired and
                the target's set; frames that still reach the source are the forwarding
                rule's (:attr:`Server.forward`)
COMMISSION      the reservation becomes the guest's assignment; the network learns the new
                place (QEMU's own announcement does it too, ``SEND_RARP``)
FREE_SOURCE     the source QEMU quits; its VF is reset and released
==============  ==========================================================================

An abort before QEMU completed cancels the migration (QEMU resumes the guest on the source
by itself) and stops the waiting QEMU; after it, the target's QEMU is stopped and the source
QEMU continues the guest (QMP ``cont``): either way the guest runs on its source VF again,
the target's VF is released and the dummy retired.

What touches QEMU and the cards is behind :class:`QemuControl` (the co-simulation's
implementation drives real QEMUs over QMP and real cards through their RootComplexes:
``cosim.scenarios.qemu_migration.TwinQemuControl``).
"""

from __future__ import annotations

from typing import Protocol

from .migration import Clock, MigrationOrchestrator, Server, Vm

__all__ = ["QemuVm", "QemuControl", "QemuMigrationOrchestrator"]


class QemuVm(Vm):
    """A VM that is a QEMU process: ``mac`` is its NIC's address. :attr:`status` is the last
    ``query-migrate`` result of its migration."""

    def __init__(self, name: str, load: float, clock: Clock, mac: bytes,
                 memory_mb: int = 256) -> None:
        super().__init__(name, load, clock, memory_mb=memory_mb)
        self.mac = bytes(mac)
        self.status: dict = {}


class QemuControl(Protocol):
    """The hypervisors' and cards' side of a QEMU migration (each call may take wall time)."""

    async def start_incoming(self, vm: QemuVm, target: Server, vf: int) -> None:
        """A QEMU on ``target``'s back-end for its VF ``vf`` waiting for ``vm``, and ``vm``'s
        QEMU migrating to it."""

    async def wait(self, vm: QemuVm) -> dict:
        """Until ``vm``'s migration ends: QEMU's ``query-migrate`` result."""

    async def switch_over(self, vm: QemuVm, source: Server, svf: int, target: Server,
                          tvf: int) -> None:
        """After completion: ``tvf`` runs the guest's rings; the cards' switches give the
        guest's MAC to ``tvf`` on ``target`` and retire ``svf``'s entry on ``source``."""

    async def cancel(self, vm: QemuVm, target: Server, vf: int) -> None:
        """Abort before completion: the migration cancelled (or failed), the waiting QEMU on
        ``target`` gone, its VF reset; the guest runs on its source VF."""

    async def revert(self, vm: QemuVm, source: Server, svf: int, target: Server,
                     tvf: int) -> None:
        """Abort after completion: the QEMU on ``target`` gone, its VF reset; the source QEMU
        continues the guest on ``svf`` (switch entries back)."""

    async def retire_source(self, vm: QemuVm, source: Server, svf: int) -> None:
        """The source QEMU quits; its VF is reset."""


class QemuMigrationOrchestrator(MigrationOrchestrator):
    """:class:`MigrationOrchestrator` with QEMU moving the guest (module docstring)."""

    def __init__(self, servers, network, t1: float, t2: float, *, control: QemuControl,
                 **kw) -> None:
        super().__init__(servers, network, t1, t2, **kw)
        self.control = control

    async def _detect_sriov(self, run) -> None:
        await super()._detect_sriov(run)
        if not run.sriov:
            raise RuntimeError(f"{run.vm.name}: no VF of {run.source.name} is assigned to it "
                               f"(a QEMU guest here always runs on one)")

    async def _move_memory(self, run) -> None:
        run.move_started = True
        await self.control.start_incoming(run.vm, run.target, run.tvf)

    async def _move_vf_state(self, run) -> None:
        vm = run.vm
        vm.status = await self.control.wait(vm)
        if vm.status.get("status") != "completed":
            raise RuntimeError(f"QEMU's migration of {vm.name} ended "
                               f"{vm.status.get('status')}: {vm.status.get('error-desc', '')}")
        run.move_done = True
        run.source.running.discard(run.svf)       # (QEMU stopped its rings at switch-over)
        run.target.running.add(run.tvf)
        run.tgt_running = True

    async def _forward(self, run) -> None:
        vm, src, tgt = run.vm, run.source, run.target
        await self.control.switch_over(vm, src, run.svf, tgt, run.tvf)
        src.forward[vm.name] = tgt
        del src.vms[vm.name]
        tgt.vms[vm.name] = vm
        vm.host, vm.vf = tgt, None
        run.paused_us = float(vm.status.get("downtime", 0)) * 1000   # QEMU's, in wall ms

    async def _commission(self, run) -> None:
        vm, tgt = run.vm, run.target
        tgt.transfer(run.tvf, run.dummy.name, vm.name)
        run.commissioned = True
        vm.vf = run.tvf
        self.network.route[vm.name] = tgt
        vm.config_vf = None

    async def _free_source(self, run) -> None:
        await self.control.retire_source(run.vm, run.source, run.svf)
        await super()._free_source(run)

    async def _rollback(self, run) -> bool:
        vm, src, tgt = run.vm, run.source, run.target
        if not run.owns_vm:
            return True
        if run.move_done:
            if run.source_freed:
                return False                     # its QEMU has quit: it stays on the target
            await self.control.revert(vm, src, run.svf, tgt, run.tvf)
            if vm.host is tgt:
                tgt.forward.pop(vm.name, None)
                del tgt.vms[vm.name]
                src.vms[vm.name] = vm
            src.forward.pop(vm.name, None)
            vm.host, vm.vf = src, run.svf
            tgt.running.discard(run.tvf)
            src.running.add(run.svf)
            self.network.route[vm.name] = src
        elif run.move_started:
            await self.control.cancel(vm, tgt, run.tvf)
        self._release_target(run)
        return True
