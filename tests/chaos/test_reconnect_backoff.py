"""A fleet that lost its broker comes back spread out in time, not in lockstep."""

from __future__ import annotations

import time

from broker.mosquitto import MosquittoBroker
from fedmq.link import BrokerAddress, Link, reconnect_delays


def test_reconnect_delays_are_per_client_and_spread() -> None:
    ids = [f"fedmq-plant7-pi-{i:04d}" for i in range(1000)]
    delays = [reconnect_delays(client_id) for client_id in ids]
    assert delays == [reconnect_delays(client_id) for client_id in ids]  # same every time
    assert all(1.0 <= lo < 2.0 and 15.0 <= hi < 30.0 and hi == 15 * lo for lo, hi in delays)
    # the first attempts of a thousand devices fill every tenth of a second of [1, 2)
    assert {int((lo - 1.0) * 10) for lo, _ in delays} == set(range(10))


def test_clients_reconnect_to_a_restarted_broker_at_their_own_times(
    plain_broker: MosquittoBroker,
) -> None:
    # twenty clients with ids of their own: a plain broker (on a fleet's broker the client
    # id is the certificate's name, so each would need a certificate; the timing is the same)
    mosquitto = plain_broker
    address = BrokerAddress(host=mosquitto.host, port=mosquitto.port)
    links = [Link(client_id=f"fedmq-t-pi-{i:04d}", address=address) for i in range(20)]
    try:
        for link in links:
            link.start()
        assert all(link.wait_connected(10) for link in links)
        mosquitto.kill()
        lost = time.monotonic()
        mosquitto.start()  # back at once: each client's first attempt succeeds
        back: dict[str, float] = {}
        while len(back) < len(links) and time.monotonic() - lost < 10:
            for link in links:
                if link.client_id not in back and link.connected:
                    back[link.client_id] = time.monotonic() - lost
            time.sleep(0.01)
        assert len(back) == len(links), sorted(back)
        for link in links:
            first_attempt = reconnect_delays(link.client_id)[0]
            assert first_attempt - 0.1 <= back[link.client_id] <= first_attempt + 1.0
        assert max(back.values()) - min(back.values()) >= 0.5, back
    finally:
        for link in links:
            link.stop(flush_s=0)
