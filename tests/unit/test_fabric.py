"""The network model's switching decision (cosim.fabric.LearningTable)."""

from cosim.fabric import LearningTable

A = bytes([0x02, 0, 0, 0, 0, 0xA])
B = bytes([0x02, 0, 0, 0, 0, 0xB])
G = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])
BCAST = b"\xff" * 6


def frame(dst, src):
    return dst + src + b"\x88\xb5" + bytes(46)


def table():
    t = LearningTable()
    for p in ("peer", "a", "b"):
        t.add_port(p)
    return t


def test_flood_then_learn():
    t = table()
    assert t.switch(frame(G, A), "a") == ["peer", "b"]        # unknown: flooded
    assert t.switch(frame(A, G), "peer") == ["a"]             # A learned on a
    assert t.switch(frame(G, A), "a") == ["peer"]             # G learned on peer
    assert t.switch(frame(BCAST, B), "b") == ["peer", "a"]    # broadcast: everyone else
    assert t.switch(frame(A, A), "a") == []                   # never back out of its port
    assert t.switch(b"\x01\x02", "a") == []                   # a runt goes nowhere


def test_a_moved_station_is_found_after_it_speaks():
    t = table()
    t.switch(frame(BCAST, G), "a")
    assert t.switch(frame(G, A), "peer") == ["a"]
    t.switch(frame(BCAST, G), "b")                            # the guest moved to b
    assert t.moves == 1
    assert t.switch(frame(G, A), "peer") == ["b"]
    t.switch(frame(G, BCAST), "a")                            # a multicast source is not learned
    assert BCAST not in t.where


def test_duplicate_port_refused():
    t = table()
    try:
        t.add_port("a")
        raise AssertionError("a second port 'a' was accepted")
    except ValueError as e:
        assert "'a'" in str(e)
