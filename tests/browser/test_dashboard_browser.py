"""The live dashboard in a real headless Chromium against a real hub process: a node
that connects appears, and turns offline when it disconnects, without a reload."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.harness import WsNode, wait_for
from tests.llm_server import LoopbackLLMServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

WAIT_S = 20


async def answer_tasks(node: WsNode, stop: asyncio.Event) -> None:
    """Play a worker: answer every task_assign with its toolArgs."""
    while not stop.is_set():
        try:
            message = await node.recv_type("task_assign", timeout=0.5)
        except TimeoutError:
            continue
        data = message["data"]
        await node.send(
            "task_result",
            {
                "taskId": data["taskId"],
                "nodeId": data["nodeId"],
                "success": True,
                "result": data["toolArgs"],
                "executionTime": 12,
            },
        )


async def test_dashboard_follows_a_node_live(browser, make_hub, artifacts_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    llm = LoopbackLLMServer().start()
    # Given a hub whose only way to mark a node offline within the test is a closed
    # socket (the heartbeat timeout is far away), with a loopback LLM upstream
    hub = make_hub(
        "embedded",
        env={
            "APEXBRIDGE_HEARTBEAT_TIMEOUT_MS": "600000",
            "APEXBRIDGE_HEARTBEAT_INTERVAL_MS": "300000",
            "APEXBRIDGE_LLM_MODEL": "openai/test-model",
            "APEXBRIDGE_LLM_API_BASE": llm.api_base,
            "APEXBRIDGE_LLM_API_KEY": "loopback",
        },
    )
    hub.staff_token()  # creates the staff user e2e-staff
    wait = WebDriverWait(browser, WAIT_S)

    def run(fn, *args):
        return asyncio.to_thread(fn, *args)

    nodes: list[WsNode] = []
    stop = asyncio.Event()
    responder: asyncio.Task | None = None
    try:
        # When staff log in to the admin and open the dashboard from the index
        await run(browser.get, f"{hub.http_url}/admin/login/?next=/admin/")
        browser.find_element(By.NAME, "username").send_keys("e2e-staff")
        browser.find_element(By.NAME, "password").send_keys("e2e-password-123")
        browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        link = await run(wait.until, ec.element_to_be_clickable((By.ID, "dashboard-link")))
        link.click()
        await run(wait.until, ec.presence_of_element_located((By.CSS_SELECTOR, "#ab-conn[data-state=live]")))
        assert browser.execute_script("return typeof Chart") == "function"  # vendored, served offline
        browser.execute_script("window.__sameDocument = 'yes'")

        # And a node connects and registers
        worker = await WsNode(hub.node_url()).connect()
        nodes.append(worker)
        await worker.register(
            "browser-worker",
            name="Browser worker",
            capabilities=["echo", "sha256"],
            config={"maxConcurrentTasks": 4, "tags": ["demo"]},
        )
        row = (By.CSS_SELECTOR, 'tr[data-node-id="browser-worker"][data-status="online"]')
        # Then its row appears, online, without a reload
        await run(wait.until, ec.presence_of_element_located(row))

        # (Some traffic, so the charts and feeds have something to show.)
        helper = await WsNode(hub.node_url()).connect()
        nodes.append(helper)
        await helper.register("browser-helper", name="Helper", type="companion", capabilities=["chat"])
        responder = asyncio.create_task(answer_tasks(worker, stop))
        for i in range(6):
            status, body = await hub.aapi(
                "POST", "/api/tasks", {"toolName": "echo", "capability": "echo", "toolArgs": {"i": i}}
            )
            assert status in (200, 201), body
        for i in range(3):
            await helper.send(
                "llm_request", {"requestId": f"r-{i}", "messages": [{"role": "user", "content": f"hi {i}"}]}
            )
            reply = await helper.recv_type("llm_response", timeout=30)
            assert reply["data"]["success"] is True, reply

        async def three_llm_requests_today() -> bool:
            status, body = await hub.aapi("GET", "/api/admin/stats")
            return status == 200 and body["llm"]["requests"] == 3

        await wait_for(three_llm_requests_today, what="3 LLM requests in the admin stats")
        await run(wait.until, ec.text_to_be_present_in_element((By.ID, "kpi-llm-requests"), "3 requests"))
        assert browser.find_element(By.ID, "kpi-tokens").text not in ("", "0")
        await run(
            wait.until,
            lambda d: (
                len(d.find_elements(By.CSS_SELECTOR, '#feed-tasks .ab-pill[data-kind="succeeded"]')) >= 6
            ),
        )

        # When the worker disconnects
        stop.set()
        await responder
        await worker.close()
        offline = (By.CSS_SELECTOR, 'tr[data-node-id="browser-worker"][data-status="offline"]')
        # Then its row turns offline, still on the same page
        await run(wait.until, ec.presence_of_element_located(offline))
        assert browser.execute_script("return window.__sameDocument") == "yes"
        status_text = browser.find_element(
            By.CSS_SELECTOR, 'tr[data-node-id="browser-worker"] .ab-status'
        ).text
        assert status_text.lower() == "offline"
        assert browser.find_element(By.ID, "kpi-offline").text == "1"
        await run(wait.until, ec.text_to_be_present_in_element((By.ID, "nodes-note"), "1 connected"))
        browser.save_screenshot(str(artifacts_dir / "dashboard.png"))
    except Exception:
        browser.save_screenshot(str(artifacts_dir / "dashboard-failure.png"))
        print(hub.log_tail(80))
        raise
    finally:
        stop.set()
        if responder is not None and not responder.done():
            responder.cancel()
        for node in nodes:
            await node.close()
        llm.stop()
