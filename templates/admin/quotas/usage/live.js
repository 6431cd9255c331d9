// The live panel: one coalesced snapshot of the running streams a second over a WebSocket
// (streaming/gateway/live_panel.py). Each snapshot is acknowledged; the server stops sending to a tab that does
// not keep up. Data goes into the page as textContent only.
// A snapshot comes every second: with none for more than data-stale-seconds (a loaded server, a lost connection),
// the panel says "stale" and greys its rows, rather than showing old streams as if they were running now.
(function () {
  "use strict";
  const panel = document.getElementById("live");
  const rows = document.getElementById("live-rows");
  const status = document.getElementById("live-status");
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + rows.dataset.wsPath;
  const staleMs = Number(panel.dataset.staleSeconds || 5) * 1000;
  let retryMs = 1000;
  let lastUpdate = performance.now();  // the page's load counts as one: "connecting…" goes stale too
  let lastStatus = "";

  function showStatus(text) {
    lastStatus = text;
    if (!panel.classList.contains("stale")) status.textContent = text;
  }

  function checkStale() {
    const silentMs = performance.now() - lastUpdate;
    if (silentMs > staleMs) {
      panel.classList.add("stale");
      status.textContent = "stale: no update for " + Math.floor(silentMs / 1000) + " s (" + lastStatus + ")";
    }
  }

  function cell(tr, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    tr.appendChild(td);
  }

  function render(message) {
    const trs = message.streams.map(function (s) {
      const tr = document.createElement("tr");
      tr.dataset.requestId = s.request_id;
      cell(tr, s.username || String(s.user_id));
      cell(tr, s.model);
      cell(tr, String(s.tokens), "num");
      cell(tr, s.tokens_per_second.toFixed(1), "num");
      cell(tr, s.paused ? "paused" : "flowing", s.paused ? "paused" : "");
      cell(tr, String(s.pauses), "num");
      cell(tr, s.seconds.toFixed(1), "num");
      return tr;
    });
    rows.replaceChildren.apply(rows, trs);
    lastUpdate = performance.now();
    panel.classList.remove("stale");
    const shown = message.total > trs.length ? " (showing " + trs.length + ")" : "";
    showStatus(message.total + " stream(s) running" + shown + " in " + message.processes +
      " process(es) · updated " + new Date(message.at * 1000).toLocaleTimeString());
  }

  function connect() {
    const socket = new WebSocket(url);
    socket.onopen = function () { retryMs = 1000; showStatus("connected"); };
    socket.onmessage = function (event) {
      const message = JSON.parse(event.data);
      if (message.type !== "snapshot") return;
      render(message);
      socket.send(JSON.stringify({ ack: message.seq }));
    };
    socket.onclose = function () {
      // Also after a sign-out: the server refuses the handshake until the page is reloaded.
      showStatus("disconnected; reconnecting in " + retryMs / 1000 + " s");
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 30000);
    };
  }

  connect();
  setInterval(checkStale, 1000);
})();
