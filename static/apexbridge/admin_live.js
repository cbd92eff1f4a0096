/* A node's admin page: keep its status badge current from /ws/admin/events/. */
(function () {
  "use strict";
  const COLOURS = { online: "#1f9d55", busy: "#d97706", offline: "#6b7280", unknown: "#9ca3af" };

  function start() {
    const badges = document.querySelectorAll("[data-live-status]");
    if (!badges.length || !("WebSocket" in window)) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    let retryMs = 1000;

    function connect() {
      const socket = new WebSocket(`${scheme}://${location.host}/ws/admin/events/`);
      socket.addEventListener("open", () => { retryMs = 1000; });
      socket.addEventListener("message", (event) => {
        let message;
        try { message = JSON.parse(event.data); } catch (error) { return; }
        const data = message.data || {};
        for (const badge of badges) {
          if (badge.dataset.liveStatus !== data.nodeId && !(data.node && data.node.nodeId === badge.dataset.liveStatus)) continue;
          let status = null;
          if (message.type === "node_status_changed") status = data.newStatus;
          else if (message.type === "node_registered") status = data.node.status;
          else if (message.type === "node_unregistered") status = "unregistered";
          if (status) {
            badge.textContent = status;
            badge.style.background = COLOURS[status] || "#6b7280";
          }
        }
      });
      socket.addEventListener("close", () => {
        setTimeout(connect, retryMs);
        retryMs = Math.min(retryMs * 2, 30000);
      });
    }
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
