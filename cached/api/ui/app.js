// The status page of cached: reads this daemon's JSON routes and follows its event stream.
//
// Everything shown comes from the network (refs, node ids, peers' addresses, error texts) and is
// untrusted: the DOM is built with createElement and textContent only, never innerHTML, and
// attribute values are set with setAttribute (never parsed as markup). Class names derived from
// data are taken from fixed lists. The page only reads: it sends GETs to its own origin.
"use strict";

(() => {
  const POLL_MS = 2000;
  const EVENT_DEBOUNCE_MS = 250;
  const MAX_EVENTS = 200;
  const RECONNECT_MIN_MS = 1000;
  const RECONNECT_MAX_MS = 15000;
  const STATES = ["queued", "fetching", "ready", "failed", "absent"];
  const MEMBER_STATES = ["alive", "suspect", "dead"];
  const RATE_WINDOW_S = 5;

  const data = { node: null, models: new Map(), cluster: null };
  // ref -> recent [seconds, bytes_done] samples from progress events: a rate that moves with the
  // transfer (the API's rate_bps is the average since the fetch started, and is polled).
  const samples = new Map();
  const $ = (id) => document.getElementById(id);

  // --- building blocks ------------------------------------------------------------------------

  function el(tag, opts, ...children) {
    const e = document.createElement(tag);
    if (opts) {
      if (opts.cls) e.className = opts.cls;
      if (opts.text !== undefined && opts.text !== null) e.textContent = String(opts.text);
      if (opts.title) e.title = String(opts.title);
      for (const [k, v] of Object.entries(opts.attrs || {})) e.setAttribute(k, String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  const known = (value, allowed) => (allowed.includes(value) ? value : "unknown");
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : 0);

  function bytes(n) {
    n = num(n);
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
  }

  const rate = (bps) => (num(bps) > 0 ? bytes(bps) + "/s" : "");
  const percent = (done, total) => (num(total) > 0 ? Math.min(100, (100 * num(done)) / num(total)) : 0);

  function duration(s) {
    if (!Number.isFinite(s) || s < 0) return "";
    s = Math.round(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function liveRate(m) {
    const s = samples.get(m.ref);
    if (s && s.length > 1) {
      const [t0, b0] = s[0], [t1, b1] = s[s.length - 1];
      if (t1 > t0 && b1 > b0) return (b1 - b0) / (t1 - t0);
    }
    return num(m.rate_bps);
  }

  function sample(ev) {
    if (ev.state !== "fetching") {
      samples.delete(ev.ref);
      return;
    }
    const s = samples.get(ev.ref) || [];
    const t = num(ev.time) || Date.now() / 1000;
    s.push([t, num(ev.bytes_done)]);
    while (s.length > 2 && t - s[0][0] > RATE_WINDOW_S) s.shift();
    samples.set(ev.ref, s);
  }

  function eta(m) {
    if (m.state === "ready") return "done";
    const r = liveRate(m);
    if (m.state !== "fetching" || r <= 0) return "";
    return duration((num(m.bytes_total) - num(m.bytes_done)) / r);
  }

  function stateBadge(state) {
    const s = known(state, STATES);
    return el("span", { cls: "badge state-" + s, text: typeof state === "string" ? state : "?" });
  }

  function progressCell(done, total) {
    const p = el("progress", { attrs: { max: Math.max(1, num(total)), value: Math.min(num(done), Math.max(1, num(total))) } });
    const pct = percent(done, total);
    return el("td", { cls: "bar" }, p, el("span", { cls: "pct", text: pct.toFixed(pct < 10 ? 1 : 0) + "%" }));
  }

  function sourcesText(sources) {
    const s = sources || {};
    return bytes(s.peer) + " / " + bytes(s.origin);
  }

  function replace(id, children) {
    $(id).replaceChildren(...children);
  }

  // --- this node ------------------------------------------------------------------------------

  function renderNode() {
    const n = data.node;
    if (!n) return;
    $("node-id").textContent = n.node_id;
    document.title = "cached · " + n.node_id;
    $("version").textContent = "v" + n.version;
    const used = num(n.used_bytes), cap = num(n.capacity_bytes);
    const meter = $("store-meter");
    meter.max = Math.max(1, cap);
    meter.low = 0.75 * meter.max;
    meter.high = 0.9 * meter.max;
    meter.value = Math.min(used, meter.max);
    $("store-text").textContent = bytes(used) + " of " + bytes(cap) + " (" + percent(used, cap).toFixed(1) + "%)";
    $("store-detail").textContent = "reserved " + bytes(n.reserved_bytes) + " · " + num(n.blobs) + " blobs";
    const counts = n.models || {};
    replace(
      "model-counts",
      ["queued", "fetching", "ready", "failed"].map((s) =>
        el("li", { attrs: { "data-state": s } }, stateBadge(s), el("span", { cls: "count", text: num(counts[s]) }))
      )
    );
    $("claims-text").textContent = num(n.pins) + " pinned · " + num(n.leases) + " leases";
  }

  // --- models and transfers -------------------------------------------------------------------

  function sortedModels() {
    return [...data.models.values()].sort((a, b) => (a.ref < b.ref ? -1 : a.ref > b.ref ? 1 : 0));
  }

  function renderModels() {
    const models = sortedModels();
    replace(
      "model-rows",
      models.map((m) =>
        el(
          "tr",
          { attrs: { "data-ref": m.ref, "data-state": known(m.state, STATES) } },
          el(
            "td",
            { cls: "ref mono", title: m.path || m.ref },
            el("span", { cls: "name", text: m.ref }),
            m.state === "failed" && m.error ? el("div", { cls: "error sub", text: m.error }) : null
          ),
          el("td", {}, stateBadge(m.state)),
          progressCell(m.bytes_done, m.bytes_total),
          el("td", { cls: "num", text: bytes(m.bytes_total) }),
          el("td", { cls: "num", text: sourcesText(m.sources) }),
          el("td", { text: m.pinned ? "pinned" : "" }),
          el("td", { cls: "num", text: Array.isArray(m.leases) && m.leases.length ? m.leases.length : "" })
        )
      )
    );
    $("models-empty").hidden = models.length > 0;

    const moving = models.filter((m) => m.state === "queued" || m.state === "fetching");
    replace(
      "transfer-rows",
      moving.map((m) =>
        el(
          "tr",
          { attrs: { "data-ref": m.ref, "data-state": known(m.state, STATES) } },
          el("td", { cls: "ref mono", text: m.ref }),
          el("td", {}, stateBadge(m.state)),
          progressCell(m.bytes_done, m.bytes_total),
          el("td", { cls: "num rate", text: rate(liveRate(m)) }),
          el("td", { cls: "num eta", text: eta(m) }),
          el("td", { cls: "num", text: sourcesText(m.sources) })
        )
      )
    );
    $("transfers-empty").hidden = moving.length > 0;

    let peer = 0, origin = 0;
    const leases = [];
    for (const m of models) {
      peer += num((m.sources || {}).peer);
      origin += num((m.sources || {}).origin);
      for (const l of Array.isArray(m.leases) ? m.leases : []) leases.push(l);
    }
    const split = $("source-split");
    split.max = Math.max(1, peer + origin);
    split.value = peer;
    const offload = peer + origin > 0 ? ((100 * peer) / (peer + origin)).toFixed(0) + "% from peers" : "nothing yet";
    $("source-text").textContent = bytes(peer) + " from peers · " + bytes(origin) + " from origin (" + offload + ")";
    replace(
      "lease-list",
      leases.map((l) => {
        const left = num(l.expires_at) - Date.now() / 1000;
        return el("li", { cls: "mono", text: l.holder + " → " + l.ref + (left > 0 ? " (" + duration(left) + " left)" : "") });
      })
    );
  }

  // --- the cluster ----------------------------------------------------------------------------

  function holderText(h) {
    if (h.state === "fetching" || h.state === "queued") return h.state + " " + percent(h.bytes_done, h.bytes_total).toFixed(0) + "%";
    return h.state;
  }

  function renderCluster() {
    const c = data.cluster;
    if (!c) return;
    const members = Array.isArray(c.members) ? c.members : [];
    replace(
      "members",
      members.map((m) =>
        el(
          "li",
          { cls: "member", attrs: { "data-node": m.node_id, "data-state": known(m.state, MEMBER_STATES) } },
          el("span", { cls: "mono node", text: m.node_id }),
          el("span", { cls: "badge member-" + known(m.state, MEMBER_STATES), text: m.self ? "this node" : m.state }),
          m.address ? el("span", { cls: "sub mono", text: m.address }) : null
        )
      )
    );
    replace("grid-head", [
      el("th", { text: "model" }),
      ...members.map((m) =>
        el("th", { cls: "mono member-" + known(m.state, MEMBER_STATES), text: m.node_id, attrs: { "data-node": m.node_id } })
      ),
    ]);
    const rows = Array.isArray(c.models) ? c.models : [];
    replace(
      "grid-rows",
      rows.map((row) => {
        const by = new Map((Array.isArray(row.holders) ? row.holders : []).map((h) => [h.node_id, h]));
        return el(
          "tr",
          { attrs: { "data-ref": row.ref } },
          el("td", { cls: "ref mono", text: row.ref, title: row.replicas ? "catalog: " + row.replicas + " replicas" : row.ref }),
          ...members.map((m) => {
            const h = by.get(m.node_id);
            const state = h ? known(h.state, STATES) : "none";
            return el("td", {
              cls: "cell state-" + state,
              text: h ? holderText(h) : "",
              title: h ? m.node_id + ": " + h.state + ", " + bytes(h.bytes_done) + " of " + bytes(h.bytes_total) : "",
              attrs: { "data-node": m.node_id, "data-state": state },
            });
          })
        );
      })
    );
    $("grid-note").textContent =
      (rows.length ? "" : "No model is held anywhere yet. ") +
      "From gossip: lags by a gossip round." +
      (c.truncated ? " Truncated: more nodes or models than shown." : "");
  }

  // This node's cell of the grid follows the event stream; other nodes' cells follow gossip.
  function updateOwnCell(ev) {
    const c = data.cluster;
    if (!c || !Array.isArray(c.models)) return;
    let row = c.models.find((r) => r.ref === ev.ref);
    if (!row) {
      row = { ref: ev.ref, replicas: null, holders: [] };
      c.models.push(row);
      c.models.sort((x, y) => (x.ref < y.ref ? -1 : x.ref > y.ref ? 1 : 0));
    }
    const holders = (Array.isArray(row.holders) ? row.holders : []).filter((h) => h.node_id !== c.node_id);
    holders.push({ node_id: c.node_id, state: ev.state, bytes_done: ev.bytes_done, bytes_total: ev.bytes_total });
    row.holders = holders;
    renderCluster();
  }

  // --- polling --------------------------------------------------------------------------------

  async function getJSON(path) {
    const resp = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin" });
    if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
    return resp.json();
  }

  let refreshing = null;
  async function refresh() {
    if (refreshing) return refreshing;
    refreshing = (async () => {
      const [node, models, cluster] = await Promise.allSettled([getJSON("v1/node"), getJSON("v1/models"), getJSON("v1/cluster")]);
      if (node.status === "fulfilled") {
        data.node = node.value;
        renderNode();
      }
      if (models.status === "fulfilled" && Array.isArray(models.value)) {
        data.models = new Map(models.value.filter((m) => m && typeof m.ref === "string").map((m) => [m.ref, m]));
        renderModels();
      }
      if (cluster.status === "fulfilled") {
        data.cluster = cluster.value;
        renderCluster();
      }
      const ok = [node, models, cluster].every((r) => r.status === "fulfilled");
      $("updated").textContent = ok ? "updated " + new Date().toLocaleTimeString() : "the daemon did not answer";
    })().finally(() => {
      refreshing = null;
    });
    return refreshing;
  }

  let soon = null;
  function refreshSoon() {
    if (soon === null) soon = setTimeout(() => ((soon = null), refresh()), EVENT_DEBOUNCE_MS);
  }

  // --- events ---------------------------------------------------------------------------------

  function addEvent(ev) {
    const when = num(ev.time) > 0 ? new Date(ev.time * 1000) : new Date();
    const detail =
      ev.state === "fetching" || ev.event === "progress"
        ? bytes(ev.bytes_done) + " of " + bytes(ev.bytes_total)
        : ev.error
          ? String(ev.error)
          : "";
    const item = el(
      "li",
      { attrs: { "data-event": ev.event, "data-ref": ev.ref } },
      el("time", { cls: "sub", text: when.toLocaleTimeString() }),
      stateBadge(ev.state),
      el("span", { cls: "kind", text: ev.event }),
      el("span", { cls: "mono ref", text: ev.ref }),
      detail ? el("span", { cls: "sub", text: detail }) : null
    );
    const list = $("event-list");
    const top = list.firstElementChild;
    if (ev.event === "progress" && top && top.dataset.event === "progress" && top.dataset.ref === ev.ref) {
      top.replaceWith(item); // one line per transfer's progress, not one every half second
      return;
    }
    list.prepend(item);
    while (list.childElementCount > MAX_EVENTS) list.lastElementChild.remove();
  }

  function applyEvent(ev) {
    if (!ev || typeof ev.ref !== "string" || typeof ev.event !== "string") return;
    addEvent(ev);
    sample(ev);
    const m = data.models.get(ev.ref) || { ref: ev.ref, sources: {}, leases: [] };
    m.state = ev.state;
    m.bytes_done = ev.bytes_done;
    m.bytes_total = ev.bytes_total;
    if (ev.error) m.error = ev.error;
    data.models.set(ev.ref, m);
    renderModels();
    updateOwnCell(ev);
    // A change of state moves other figures too (sources, paths, counts, the grid).
    if (ev.event !== "progress") refreshSoon();
  }

  function setLive(on, text) {
    const live = $("live");
    live.className = "live " + (on ? "on" : "off");
    live.textContent = text;
  }

  async function follow() {
    let wait = RECONNECT_MIN_MS;
    for (;;) {
      try {
        const resp = await fetch("v1/events", { headers: { Accept: "application/x-ndjson" }, cache: "no-store" });
        if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
        setLive(true, "live");
        wait = RECONNECT_MIN_MS;
        refresh();
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          let nl;
          while ((nl = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, nl).trim();
            buf = buf.slice(nl + 1);
            if (!line) continue; // keep-alive
            try {
              applyEvent(JSON.parse(line));
            } catch (e) {
              console.warn("bad event line", e);
            }
          }
        }
      } catch (e) {
        console.warn("event stream", e);
      }
      setLive(false, "reconnecting");
      await new Promise((r) => setTimeout(r, wait));
      wait = Math.min(RECONNECT_MAX_MS, wait * 2);
    }
  }

  function start() {
    refresh();
    setInterval(refresh, POLL_MS);
    follow();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
