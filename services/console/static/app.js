// The console page: one event stream (/api/events) renders the live view; buttons call /api/*.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let apiKey = sessionStorage.getItem("console-key") || "";
  let snapshot = null;
  let currentToken = "";
  let hubRepo = null;
  const conversation = []; // {role, content, stats}; kept while the page is open
  let chatAbort = null;

  // --- helpers ------------------------------------------------------------------------------------
  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if (apiKey) h["Authorization"] = "Bearer " + apiKey;
    return h;
  }

  async function api(path, body, method) {
    const opts = { method: method || (body === undefined ? "GET" : "POST"), headers: headers(body !== undefined) };
    if (body !== undefined) opts.body = JSON.stringify(body);
    let response;
    try {
      response = await fetch(path, opts);
    } catch (e) {
      return { ok: false, error: "the console does not answer (is `meshctl console` still running?)" };
    }
    let data = {};
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    if (response.status === 401) showKeyPrompt();
    if (!response.ok) return { ok: false, error: data.error || `HTTP ${response.status}` };
    return { ok: true, data };
  }

  function say(id, text, kind) {
    const el = $(id);
    el.textContent = text || "";
    el.className = "msg " + (kind || "");
  }

  const gb = (n) => ((n || 0) / (1 << 30)).toFixed(1) + " GB";
  const mb = (n) => ((n || 0) / 1e6).toFixed(1) + " MB";
  function bytes(n) {
    if (n === null || n === undefined) return "?";
    if (n >= 1e12) return (n / 1e12).toFixed(1) + " TB";
    if (n >= 1e9) return (n / 1e9).toFixed(2) + " GB";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + " MB";
    if (n >= 1e3) return (n / 1e3).toFixed(1) + " kB";
    return n + " B";
  }
  const short = (id) => (id || "").slice(0, 8);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v !== undefined && v !== null) node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  async function busy(button, work) {
    button.disabled = true;
    const label = button.textContent;
    button.textContent = label + "…";
    try { return await work(); } finally { button.disabled = false; button.textContent = label; }
  }

  // --- key prompt -----------------------------------------------------------------------------------
  function showKeyPrompt() {
    $("keyprompt").classList.remove("hidden");
    $("key-input").focus();
  }
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    apiKey = $("key-input").value.trim();
    sessionStorage.setItem("console-key", apiKey);
    $("keyprompt").classList.add("hidden");
    connect();
  });

  // --- tabs -----------------------------------------------------------------------------------------
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
      for (const v of document.querySelectorAll(".view")) v.classList.toggle("hidden", v.id !== "view-" + tab.dataset.view);
      if (tab.dataset.view === "models") loadLocalModels();
    });
  }

  // --- live view ------------------------------------------------------------------------------------
  // The payload of every "data: " line of a server-sent event stream (the console's own and the chat's),
  // then afterChunk once per chunk read.
  async function readEventStream(response, onData, afterChunk) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
      if (afterChunk) afterChunk();
    }
  }

  let streamGeneration = 0;
  async function connect() {
    const generation = ++streamGeneration;
    while (generation === streamGeneration) {
      try {
        const response = await fetch("/api/events", { headers: headers(false) });
        if (response.status === 401) { showKeyPrompt(); setLive(false); return; }
        if (!response.ok) throw new Error("HTTP " + response.status);
        setLive(true);
        await readEventStream(response, (data) => render(JSON.parse(data)));
      } catch (e) { /* reconnect below */ }
      setLive(false);
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  function setLive(on) {
    $("live").textContent = on ? "live" : "offline";
    $("live").className = "live " + (on ? "on" : "off");
  }

  function render(snap) {
    snapshot = snap;
    const view = snap.view, node = snap.node;
    // this node
    const services = Object.entries(view.services || {}).filter(([, up]) => up).map(([s]) => s);
    let line;
    if (node.busy) line = `The node is ${node.busy}…`;
    else if (!node.running) line = "No node is running for this MESH_HOME. Start one: it serves the model shown under Models, or joins as a lite client.";
    else line = `Node ${short(view.node_id) || "?"} in mesh ${view.mesh_id || "?"} — ${node.client ? "lite client" : "model " + (node.model ? node.model.split("/").pop() : "default")} — services up: ${services.join(", ") || "none yet"} — API on port ${node.api_port}`;
    $("node-line").textContent = line;
    $("node-line").dataset.nodeId = view.node_id || "";
    $("node-error").textContent = node.error || "";
    $("node-error").classList.toggle("hidden", !node.error);
    $("start-solo").disabled = $("start-client").disabled = !!node.busy;
    $("stop-node").disabled = !!node.busy || !node.running;
    for (const id of ["show-token", "rotate-token", "join-button", "leave"]) $(id).disabled = !node.running || !!node.busy;
    $("start-solo").textContent = node.running ? "Restart with a model" : "Start node";
    $("start-client").textContent = node.running ? "Restart as lite client" : "Start as lite client";

    // plan
    const plan = view.plan;
    // electd's plan in the words `meshctl status` uses (common/plan_text.py), until one is heard
    const planText = plan.state === "unknown" || plan.state === "starting" ? {
      starting: "Starting…", unknown: node.running ? (node.client ? "Lite client: requests go to the mesh's host." :
        "Waiting for electd…") : "Node not running.",
    }[plan.state] : plan.line.charAt(0).toUpperCase() + plan.line.slice(1) + ".";
    $("plan-line").textContent = planText;
    $("plan-line").dataset.state = plan.state;
    const bar = $("split-bar");
    bar.replaceChildren();
    if (plan.state === "split" || plan.state === "solo") {
      plan.split.forEach((m, i) => {
        const seg = el("div", { class: "seg seg" + (i % 4), title: `${short(m.node_id)}: ${(m.ratio * 100).toFixed(0)}%` },
          `${short(m.node_id)}${m.host ? " (host)" : ""} ${(m.ratio * 100).toFixed(0)}%`);
        seg.style.width = (m.ratio * 100).toFixed(1) + "%";
        bar.append(seg);
      });
    }
    const waiting = $("plan-waiting");
    waiting.classList.toggle("hidden", plan.state !== "waiting");
    waiting.textContent = plan.state === "waiting" ? `Waiting for more peers: need ${gb(plan.needed_bytes)}, have ${gb(plan.available_bytes)}.` : "";
    $("exclusions").replaceChildren(...plan.excluded.map((x) => el("li", { class: "warn" }, `${short(x.node_id)} excluded: ${x.reason}`)));
    const runner = view.runner;
    if (runner) {
      const llama = runner.llama;
      const detail = llama.detail && llama.detail !== plan.reason ? " — " + llama.detail : "";
      $("llama-line").textContent = `llama-server: ${llama.state}${detail}` +
        (runner.progress ? ` · ${runner.progress}` : "") +
        ` · rpc-server: ${runner.rpc.state}` + (runner.status ? ` · runner: ${runner.status}` : "") +
        (runner.weights.length ? " · weights: " + runner.weights.map((w) => `${short(w.node_id)} ${mb(w.local_bytes)} from its own file, ${mb(w.sent_bytes)} sent`).join("; ") : "");
    } else {
      $("llama-line").textContent = "";
    }
    const chats = snap.chats.filter((c) => c.tok_s);
    const decode = runner && runner.decode.tok_s ? runner.decode : null;  // every sender's, from llama-server
    $("toks-line").textContent = [
      decode ? `Recent requests on this node's llama-server: ${decode.tok_s.toFixed(1)} tok/s (${decode.tokens} tokens, ` +
        `as of ${new Date(decode.at * 1000).toLocaleTimeString()})` : "",
      chats.length ? (decode ? "from this console: " : "Recent requests from this console: ") +
        chats.slice(-5).map((c) => `${c.tok_s.toFixed(1)} tok/s (${c.tokens} tokens${c.stopped ? ", stopped" : ""})`)
          .join(", ") : "",
    ].filter(Boolean).join(" · ");

    // nodes
    const tbody = $("nodes").querySelector("tbody");
    tbody.replaceChildren(...view.nodes.map((n) => {
      const match = n.model_match === null ? "" : n.model_match ? " ✓ same file" : " ✗ different file";
      return el("tr", { "data-node": n.node_id, class: n.me ? "me" : "" },
        el("td", { "data-label": "node" }, el("code", {}, short(n.node_id)), n.me ? " (this node)" : ""),
        el("td", { "data-label": "role" }, el("span", { class: "badge " + n.role.replace(" ", "-") }, n.role)),
        el("td", { "data-label": "memory" }, n.role === "lite client" ? "—" : gb(n.memory_bytes),
          el("small", {}, n.memory_source && n.role !== "lite client" ? " " + n.memory_source : "")),
        el("td", { "data-label": "model" }, n.model || "—", el("small", { class: n.model_match === false ? "warn" : "" },
          (n.fingerprint ? " " + n.fingerprint.slice(0, 8) : "") + match)),
        el("td", { "data-label": "path" }, n.me ? "—" : !n.connected ? "not connected"
          : `${n.path || "direct"} QUIC` + (n.relay ? " via " + n.relay : "") + (n.lane ? ", lane " + n.lane : "")
            + (n.rpc_path ? ", rpc " + n.rpc_path : "")),
        el("td", { "data-label": "RTT" }, n.rtt_ms === null ? "—" : n.rtt_ms.toFixed(1) + " ms"),
        el("td", { "data-label": "bytes" }, n.me ? "—" : `${bytes(n.bytes_in)} / ${bytes(n.bytes_out)}`),
        el("td", { "data-label": "status" }, n.status + (n.placement ? " · " + n.placement : "")));
    }));
    if (!view.nodes.length) tbody.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no node yet")));
    $("errors").replaceChildren(...(view.errors.length ? view.errors.map((e) => el("li", { class: "error" }, e))
      : [el("li", { class: "muted" }, "none")]));

    // models view
    $("models-dir").textContent = snap.models_dir;
    renderDownloads(snap.downloads);
  }

  // --- node control ---------------------------------------------------------------------------------
  $("start-solo").addEventListener("click", (e) => busy(e.target, async () => {
    const r = await api("/api/node/start", { client: false });
    if (!r.ok) $("node-error").textContent = r.error, $("node-error").classList.remove("hidden");
  }));
  $("start-client").addEventListener("click", (e) => busy(e.target, async () => {
    const r = await api("/api/node/start", { client: true });
    if (!r.ok) $("node-error").textContent = r.error, $("node-error").classList.remove("hidden");
  }));
  $("stop-node").addEventListener("click", (e) => busy(e.target, async () => {
    const r = await api("/api/node/stop", {});
    if (!r.ok) $("node-error").textContent = r.error, $("node-error").classList.remove("hidden");
  }));

  // --- token, join, leave ---------------------------------------------------------------------------
  async function fetchToken(rotate) {
    const r = await api("/api/token", { rotate });
    if (!r.ok) { say("invite-msg", r.error, "error"); return; }
    currentToken = r.data.token;
    $("token-box").value = currentToken;
    $("token-box").classList.remove("hidden");
    $("copy-token").disabled = false;
    say("invite-msg", rotate ? "New secret: old tokens no longer admit new nodes." : "", "ok");
  }
  $("show-token").addEventListener("click", (e) => busy(e.target, () => fetchToken(false)));
  $("rotate-token").addEventListener("click", (e) => {
    if (!confirm("Rotate the mesh secret? Tokens given out so far will stop admitting new nodes.")) return;
    busy(e.target, () => fetchToken(true));
  });
  $("copy-token").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(currentToken); say("invite-msg", "Copied.", "ok"); } catch (e) {
      $("token-box").select(); document.execCommand("copy"); say("invite-msg", "Copied.", "ok");
    }
  });
  $("join-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("join-input").value.trim();
    if (!token) { say("join-msg", "Paste a token first (another node prints it with `meshctl token`).", "error"); return; }
    say("join-msg", "Joining…", "");
    busy($("join-button"), async () => {
      const r = await api("/api/join", { token });
      if (r.ok) { say("join-msg", `Joined mesh ${r.data.mesh_id} through node ${short(r.data.via)}.`, "ok"); $("join-input").value = ""; }
      else say("join-msg", r.error, "error");
    });
  });
  $("leave").addEventListener("click", (e) => {
    if (!confirm("Leave this mesh? This node will be on its own, in a new mesh.")) return;
    busy(e.target, async () => {
      const r = await api("/api/leave", {});
      if (r.ok) say("join-msg", "", "");
      say("invite-msg", r.ok ? `Left the mesh; this node is now alone in mesh ${r.data.mesh_id}.` : r.error, r.ok ? "ok" : "error");
    });
  });

  // --- models ---------------------------------------------------------------------------------------
  async function useModel(path, button) {
    say("model-msg", "Restarting the node with " + path + "…", "");
    await busy(button, async () => {
      const r = await api("/api/node/start", { model: path, client: false });
      say("model-msg", r.ok ? "The node restarted with " + path + "; the Mesh view shows it loading." : r.error, r.ok ? "ok" : "error");
    });
  }

  async function loadLocalModels() {
    const r = await api("/api/models/local");
    const tbody = $("local-models").querySelector("tbody");
    if (!r.ok) { say("model-msg", r.error, "error"); return; }
    const current = snapshot && snapshot.node.model;
    tbody.replaceChildren(...r.data.models.map((m) => el("tr", { "data-file": m.file },
      el("td", { "data-label": "file" }, m.file, m.path === current ? el("small", { class: "ok" }, " (in use)") : ""),
      el("td", { "data-label": "size" }, bytes(m.size_bytes)),
      el("td", { "data-label": "architecture" }, m.error ? el("span", { class: "error" }, m.error) : m.arch),
      el("td", { "data-label": "layers" }, m.n_layers || "—"),
      el("td", {}, m.error ? "" : el("button", { class: "secondary", onclick: (e) => useModel(m.path, e.target) }, "Use")))));
    if (!r.data.models.length) tbody.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "no .gguf files yet: download one below")));
  }

  $("path-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const path = $("path-input").value.trim();
    const check = await api("/api/models/check", { path });
    if (!check.ok) { say("model-msg", check.error, "error"); return; }
    await useModel(check.data.path, $("path-button"));
  });

  $("hub-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("hub-input").value.trim();
    if (/^[\w.-]+\/[\w.-]+$/.test(q)) { openRepo(q); return; }
    busy($("hub-search"), async () => {
      say("hub-msg", "Searching…", "");
      const r = await api("/api/hub/search?q=" + encodeURIComponent(q));
      if (!r.ok) { say("hub-msg", r.error, "error"); $("hub-results").replaceChildren(); return; }
      say("hub-msg", r.data.results.length ? "" : "No GGUF repos found for that search.", "");
      $("hub-results").replaceChildren(...r.data.results.map((m) => el("li", {},
        el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); openRepo(m.repo); } }, m.repo),
        el("small", { class: "muted" }, ` ${m.downloads} downloads`))));
    });
  });
  $("hub-open").addEventListener("click", () => openRepo($("hub-input").value.trim()));

  async function openRepo(repo) {
    say("hub-msg", "Listing " + repo + "…", "");
    const r = await api("/api/hub/files?repo=" + encodeURIComponent(repo));
    const table = $("hub-files");
    if (!r.ok) { say("hub-msg", r.error, "error"); table.classList.add("hidden"); $("hub-repo-title").classList.add("hidden"); return; }
    hubRepo = r.data.repo;
    say("hub-msg", r.data.files.length ? "" : "This repo has no .gguf files.", r.data.files.length ? "" : "error");
    $("hub-repo-title").textContent = hubRepo;
    $("hub-repo-title").classList.remove("hidden");
    table.classList.toggle("hidden", !r.data.files.length);
    table.querySelector("tbody").replaceChildren(...r.data.files.map((f) => el("tr", { "data-file": f.file },
      el("td", { "data-label": "file" }, f.file),
      el("td", { "data-label": "size" }, bytes(f.size_bytes)),
      el("td", { "data-label": "checksum" }, f.sha256 ? "sha256 " + f.sha256.slice(0, 10) + "…" : "size only"),
      el("td", {}, el("button", { onclick: (e) => download(f.file, e.target) }, "Download")))));
  }

  async function download(file, button) {
    await busy(button, async () => {
      const r = await api("/api/hub/download", { repo: hubRepo, file });
      say("hub-msg", r.ok ? "Started " + file + ": progress below." : r.error, r.ok ? "" : "error");
    });
  }

  // Cards are kept per download and updated in place, so a button is never replaced under the pointer.
  const downloadCards = new Map();
  function renderDownloads(list) {
    const box = $("downloads");
    const present = new Set(list.map((d) => d.id));
    for (const [id, card] of downloadCards) {
      if (!present.has(id)) { card.root.remove(); downloadCards.delete(id); }
    }
    for (const d of list.slice().reverse()) {
      let card = downloadCards.get(d.id);
      if (!card) {
        card = {
          root: el("div", { class: "download", "data-file": d.file }), state: el("span", { class: "state" }),
          fill: el("div", { class: "fill" }), line: el("div", { class: "muted" }), error: el("div", { class: "error" }),
          actions: el("div", { class: "row" }), shownState: null,
        };
        card.root.append(el("div", { class: "row spread" }, el("strong", {}, d.file), card.state),
          el("div", { class: "progress" }, card.fill), card.line, card.error, card.actions);
        downloadCards.set(d.id, card);
        box.prepend(card.root);
      }
      const pct = d.total_bytes ? Math.min(100, (100 * d.done_bytes) / d.total_bytes) : 0;
      card.root.className = "download " + d.state;
      card.state.textContent = d.state;
      card.fill.style.width = pct.toFixed(1) + "%";
      const eta = d.eta_s === null ? "" : ` · ${Math.ceil(d.eta_s)} s left`;
      const rate = d.rate_bps ? ` · ${bytes(d.rate_bps)}/s` : "";
      card.line.textContent = `${bytes(d.done_bytes)} of ${bytes(d.total_bytes)} (${pct.toFixed(0)}%)${rate}${eta}` +
        (d.resumed_from ? ` · resumed at ${bytes(d.resumed_from)}` : "") +
        (d.state === "done" ? ` · verified: size${d.sha256 ? " and sha256" : ""} match the Hub, GGUF header read` : "");
      card.error.textContent = d.error || "";
      if (card.shownState === d.state) continue;
      card.shownState = d.state;
      const stop = (how) => () => api("/api/hub/download/stop", { id: d.id, how });
      const actions = [];
      if (["queued", "checking", "downloading", "verifying"].includes(d.state)) {
        actions.push(el("button", { class: "secondary", onclick: stop("pause") }, "Pause"));
        actions.push(el("button", { class: "danger", onclick: stop("cancel") }, "Cancel"));
      } else if (d.next === "resume" || d.next === "retry") {
        actions.push(el("button", { onclick: (e) => { hubRepo = d.repo; download(d.file, e.target); } },
          d.next === "resume" ? "Resume" : "Try again"));
        actions.push(el("button", { class: "danger", onclick: stop("cancel") }, d.next === "resume" ? "Discard" : "Dismiss"));
      } else if (d.state === "failed" || d.state === "cancelled") {
        actions.push(el("button", { class: "secondary", onclick: stop("cancel") }, "Dismiss"));
      } else if (d.state === "done") {
        loadLocalModels();
        actions.push(el("button", { onclick: (e) => useModel(d.path, e.target) }, "Use this model"));
      }
      card.actions.replaceChildren(...actions);
    }
  }

  // --- chat -----------------------------------------------------------------------------------------
  function renderConversation() {
    const box = $("conversation");
    box.replaceChildren(...conversation.map((m) => {
      const body = el("div", { class: "body" });
      if (m.role === "assistant") body.innerHTML = window.renderMarkdown(m.content || "");
      else body.textContent = m.content;
      return el("div", { class: "message " + m.role }, el("div", { class: "who" }, m.role === "user" ? "you" : "model"), body,
        m.stats ? el("div", { class: "stats muted" }, m.stats) : "");
    }));
    box.scrollTop = box.scrollHeight;
  }

  async function sendChat() {
    const text = $("chat-input").value.trim();
    if (!text) { say("chat-msg", "Type a message first.", "error"); return; }
    if (chatAbort) return;
    say("chat-msg", "", "");
    conversation.push({ role: "user", content: text });
    const reply = { role: "assistant", content: "", stats: "waiting for the model…" };
    conversation.push(reply);
    $("chat-input").value = "";
    renderConversation();
    chatAbort = new AbortController();
    $("chat-stop").disabled = false;
    $("chat-send").disabled = true;
    const started = performance.now();
    let first = null, tokens = 0, stopped = false;
    const history = conversation.filter((m) => m !== reply).map((m) => ({ role: m.role, content: m.content }));
    try {
      const response = await fetch("/api/chat", { method: "POST", headers: headers(true), body: JSON.stringify({ messages: history }), signal: chatAbort.signal });
      if (!response.ok) {
        let error = "HTTP " + response.status;
        try { error = (await response.json()).error || error; } catch (e) { /* keep */ }
        throw new Error(error);
      }
      await readEventStream(response, (data) => {
        if (data === "[DONE]") return;
        let event;
        try { event = JSON.parse(data); } catch (e) { return; }
        if (event.error) throw new Error(event.error.message || "the model failed");
        const delta = event.choices && event.choices[0] && event.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          tokens++;
          reply.content += delta.content;
        }
        if (event.timings && event.timings.predicted_per_second) reply.serverRate = event.timings.predicted_per_second;
      }, () => {
        const seconds = first === null ? 0 : (performance.now() - first) / 1000;
        reply.stats = `${tokens} tokens` + (seconds > 0.2 ? ` · ${(tokens / seconds).toFixed(1)} tok/s` : "");
        renderConversation();
      });
    } catch (e) {
      if (e.name === "AbortError") stopped = true;
      else say("chat-msg", e.message, "error");
    } finally {
      const seconds = first === null ? 0 : (performance.now() - first) / 1000;
      const rate = reply.serverRate || (seconds > 0 ? tokens / seconds : 0);
      reply.stats = `${tokens} tokens in ${((performance.now() - started) / 1000).toFixed(1)} s` +
        (rate ? ` · ${rate.toFixed(1)} tok/s` : "") + (stopped ? " · stopped" : "");
      if (!reply.content && !stopped) conversation.splice(conversation.indexOf(reply), 1);
      chatAbort = null;
      $("chat-stop").disabled = true;
      $("chat-send").disabled = false;
      $("chat-stats").textContent = reply.stats;
      renderConversation();
    }
  }
  $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); sendChat(); });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); }
  });
  $("chat-stop").addEventListener("click", () => { if (chatAbort) chatAbort.abort(); });
  $("chat-clear").addEventListener("click", () => { if (!chatAbort) { conversation.length = 0; renderConversation(); } });

  connect();
})();
