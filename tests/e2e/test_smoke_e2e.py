import pytest

from tests.e2e.harness import WsNode

pytestmark = pytest.mark.e2e


async def test_register_over_real_socket(hub_any):
    node = await WsNode(hub_any.node_url()).connect()
    try:
        await node.register("e2e-1", capabilities=["echo"])
        await node.send("heartbeat", {"nodeId": "e2e-1"})
        ack = await node.recv_type("heartbeat_ack")
        assert ack["data"]["success"] is True
    finally:
        await node.close()
