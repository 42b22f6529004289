"""The card brought up through the host driver: the start of most benches."""

from cosim.harness import CardHarness


async def bring_up(dut, num_vfs=2):
    h = CardHarness(dut)
    await h.start()
    pf = await h.drv.probe()
    vfs = await h.drv.enable_sriov(num_vfs) if num_vfs else []
    return h, pf, vfs
