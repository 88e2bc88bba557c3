"""When a worker's requests of one front have no one to answer to: from its connection's events."""

import math

import zmq

from worker.link import Contact


def test_requests_are_orphans_once_the_front_is_out_of_reach_longer_than_it_waits():
    contact = Contact()
    contact.event(zmq.EVENT_DISCONNECTED, 10.0)
    assert contact.orphaned_at() == math.inf  # no welcome yet: the front's patience is unknown
    contact.patience = 2.0
    assert contact.orphaned_at() == 12.0
    contact.event(zmq.EVENT_DISCONNECTED, 11.0)  # a failed reconnect does not restart the clock
    assert contact.orphaned_at() == 12.0
    contact.event(zmq.EVENT_HANDSHAKE_SUCCEEDED, 11.5)  # back in time: nothing is orphaned
    assert contact.orphaned_at() == math.inf
    contact.event(zmq.EVENT_DISCONNECTED, 20.0)
    assert contact.orphaned_at() == 22.0
