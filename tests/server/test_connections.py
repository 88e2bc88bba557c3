"""The connection bound's policy: shed the oldest idle connection, refuse only when all are at work."""

from server.connections import Connections


def test_below_the_bound_every_connection_is_admitted():
    connections = Connections(limit=2)
    assert connections.admit("a") == (True, None)
    assert connections.admit("b") == (True, None)


def test_past_the_bound_the_oldest_idle_connection_makes_room():
    connections = Connections(limit=2)
    connections.admit("a")
    connections.admit("b")
    connections.mark("a", idle=False)  # a request on a
    connections.mark("a", idle=True)  # answered: a is now the newest idle
    assert connections.admit("c") == (True, "b")
    assert connections.open == {"a", "c"} and connections.shed == 1


def test_with_every_connection_at_work_a_new_one_is_refused():
    connections = Connections(limit=2)
    for name in "ab":
        connections.admit(name)
        connections.mark(name, idle=False)
    assert connections.admit("c") == (False, None)
    assert connections.open == {"a", "b"} and connections.refused == 1
    connections.forget("a")
    assert connections.admit("c") == (True, None)


def test_a_closed_connection_is_not_marked_idle_again():
    connections = Connections(limit=1)
    connections.admit("a")
    connections.forget("a")
    connections.mark("a", idle=True)
    assert not connections.idle
